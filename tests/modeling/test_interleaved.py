"""Interleaved multi-image inputs: any number of images per sample (zero included) at any position in the text, in any
chat turn, single-view or any-res; batched results equal each sample run alone, in forward and in beam search."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import IMAGE_ID, make_tokenizer, vlm_config
from transformers import SiglipImageProcessorPil

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.processing import BridgeAnyResImageProcessor, BridgeProcessor
from vlbridge.trainers import ChatCollator


pytestmark = pytest.mark.usefixtures("single_thread")

N = 4  # tokens per image (per tile with any-res) of the tiny bridges
PINPOINTS = [[32, 64], [64, 32], [64, 64]]

# Three samples with 3, 0 and 1 images, placeholders at the start, in the middle and at the end of the text.
TEXTS = ["<image> a red <image> circle and a <image>", "what is the colour ?", "a blue <image> square"]
SIZES = [[(32, 32), (40, 70), (64, 64)], [], [(70, 40)]]


def images(seed: int = 0) -> list[list[Image.Image]]:
    rng = np.random.default_rng(seed)
    return [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sample] for sample in SIZES]


def make_processor(anyres: bool, padding_side: str = "right") -> BridgeProcessor:
    size = {"height": 32, "width": 32}
    if anyres:
        image_processor = BridgeAnyResImageProcessor(size=size, image_grid_pinpoints=PINPOINTS)
    else:
        image_processor = SiglipImageProcessorPil(size=size)
    return BridgeProcessor(image_processor, make_tokenizer(padding_side=padding_side), num_image_tokens=N)


def make_model(anyres: bool, bridge: str = "perceiver", seed: int = 0) -> BridgeVLMForConditionalGeneration:
    torch.manual_seed(seed)
    config = vlm_config("clip", bridge, "llama", image_grid_pinpoints=PINPOINTS if anyres else None)
    return BridgeVLMForConditionalGeneration(config).eval()


def image_positions(ids) -> list[int]:
    return [j for j, token in enumerate(ids) if token == IMAGE_ID]


@pytest.mark.parametrize("anyres", [False, True])
@pytest.mark.parametrize("bridge", ["perceiver", "qformer"])
def test_batch_with_0_1_3_images_gives_each_sample_its_own_logits(anyres, bridge):
    processor, model = make_processor(anyres), make_model(anyres, bridge)
    batch = processor(images=images(), text=TEXTS, return_tensors="pt", padding=True)
    per_image = [processor.num_tiles([(h, w)])[0] * N for sample in SIZES for h, w in sample]
    counts = (batch["input_ids"] == IMAGE_ID).sum(-1).tolist()
    assert counts == [sum(per_image[:3]), 0, per_image[3]]
    with torch.no_grad():
        batched = model(**batch).logits
        for i, (text, sample_images) in enumerate(zip(TEXTS, images())):
            alone = processor(images=[sample_images], text=[text], return_tensors="pt")
            logits = model(**alone).logits[0]
            assert torch.equal(batch["input_ids"][i, : logits.shape[0]], alone["input_ids"][0])
            torch.testing.assert_close(batched[i, : logits.shape[0]], logits, atol=1e-5, rtol=1e-5)


def run_starts(ids) -> list[int]:
    """Where each run of image tokens (one image) starts."""
    return [j for j in image_positions(ids) if j == 0 or ids[j - 1] != IMAGE_ID]


@pytest.mark.parametrize("anyres", [False, True])
def test_each_image_goes_to_its_own_placeholder(anyres):
    """Changing the second image leaves everything before its placeholder alone; changing the first changes what
    follows the first placeholder: images fill the placeholders in order."""
    processor, model = make_processor(anyres), make_model(anyres)
    rng = np.random.default_rng(1)
    first, other, last = (Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)) for _ in range(3))
    text = ["<image> a red <image> circle"]
    with torch.no_grad():
        ab, ob, aa = (
            model(**processor(images=[pair], text=text, return_tensors="pt")).logits[0]
            for pair in ([first, last], [other, last], [first, first])
        )
    ids = processor(images=[[first, last]], text=text)["input_ids"][0]
    first_start, second_start = run_starts(ids)
    torch.testing.assert_close(ab[:second_start], aa[:second_start], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ab[second_start:], aa[second_start:], atol=1e-4)
    torch.testing.assert_close(ab[:first_start], ob[:first_start], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ab[first_start:second_start], ob[first_start:second_start], atol=1e-4)


def chat(image_turns: list[int], num_turns: int = 2) -> list[dict]:
    """A conversation whose user turn k (0-based) holds one image for each k in `image_turns`."""
    messages = []
    for turn in range(num_turns):
        content = [{"type": "text", "text": ["what is it ?", "and the colour ?", "how many ?"][turn]}]
        content = [{"type": "image"}] * image_turns.count(turn) + content
        messages += [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": ["a circle", "red", "two"][turn]}]},
        ]
    return messages


@pytest.mark.parametrize("anyres", [False, True])
def test_images_in_the_second_chat_turn(anyres):
    processor, model = make_processor(anyres), make_model(anyres)
    (a, b, c), _, (d,) = images()
    rows = [
        {"messages": chat([1]), "images": [b]},  # the only image in the second turn
        {"messages": chat([0, 1, 1]), "images": [a, c, d]},  # one in the first turn, two in the second
        {"messages": chat([])},  # none
    ]
    batch = ChatCollator(processor)(rows)
    tokenizer = processor.tokenizer
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = [j for j, label in enumerate(labels) if label != -100]
        assert tokenizer.decode([ids[j] for j in trained]) == "a circle </s> red </s>"
        assert not set(trained) & set(image_positions(ids))
    # Sample 0: the image tokens come after the first answer.
    first_answer_end = [j for j, label in enumerate(batch["labels"][0].tolist()) if label != -100][2]
    assert min(image_positions(batch["input_ids"][0].tolist())) > first_answer_end

    with torch.no_grad():
        logits = model(**batch).logits
        # Another image in the second turn leaves the first turn untouched (causal) and changes the second.
        other = ChatCollator(processor)([{"messages": chat([1]), "images": [d]}])
        other_logits = model(**other).logits[0]
    length = other_logits.shape[0]
    start = min(image_positions(batch["input_ids"][0].tolist()))
    torch.testing.assert_close(logits[0, :start], other_logits[:start], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0, start:length], other_logits[start:], atol=1e-4)
    # Each sample of the mixed batch equals itself alone.
    for i, row in enumerate(rows):
        alone = ChatCollator(processor)([row])
        with torch.no_grad():
            expected = model(**alone).logits[0]
        torch.testing.assert_close(logits[i, : expected.shape[0]], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("anyres", [False, True])
def test_beam_search_keeps_each_samples_images(anyres):
    """Beam search repeats each sample: its images must follow it as a group (a plain per-image repeat would give a
    two-image sample's copies the images [a, a] and [b, b]). Every beam's first-step logits must be those of a plain
    forward pass of its sample alone (the random tiny model is not very sensitive to images, hence the tolerances)."""
    processor, model = make_processor(anyres, padding_side="left"), make_model(anyres)
    with torch.no_grad():  # let the images weigh on the logits of the random tiny model
        model.model.language_projection.weight.mul_(50)
    (a, b, _), _, (d,) = images()
    samples = [("<image> a red <image> circle", [a, b]), ("a blue <image> square", [d])]
    batch = processor(
        images=[imgs for _, imgs in samples], text=[text for text, _ in samples], return_tensors="pt", padding=True
    )
    generated = model.generate(
        **batch,
        max_new_tokens=2,
        num_beams=2,
        num_return_sequences=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert generated.sequences.shape[0] == 4
    first_step = generated.logits[0]  # (batch * num_beams, vocab)
    for i, (text, sample_images) in enumerate(samples):
        with torch.no_grad():
            expected = model(**processor(images=[sample_images], text=[text], return_tensors="pt")).logits[0, -1]
        for beam in (2 * i, 2 * i + 1):
            torch.testing.assert_close(first_step[beam], expected, atol=2e-5, rtol=0)
    # The check has teeth: the images [a, a], which a per-image repeat would give the first copy, differ by far more.
    with torch.no_grad():
        repeated = model(**processor(images=[[a, a]], text=[samples[0][0]], return_tensors="pt")).logits[0, -1]
    assert (repeated - first_step[0]).abs().max() > 1e-4
