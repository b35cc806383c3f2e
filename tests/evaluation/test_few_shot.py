"""Few-shot captioning: the prompts and image lists each query gets (k examples from the support set, then the
query), nested across shot counts and independent of the batch size, and the scoring."""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import SiglipImageProcessorPil

from vlbridge.data import build_word_tokenizer, caption_vocabulary
from vlbridge.evaluation import evaluate_few_shot, few_shot_prompts
from vlbridge.processing import BridgeProcessor


CAPTIONS = ["a red circle", "a blue star", "two green squares", "a large yellow cross", "a small black diamond"]


def solid(value: int) -> Image.Image:
    """An image whose red channel names it (support images 10, 20, ...; queries 200, 210, ...)."""
    return Image.new("RGB", (32, 32), (value, 0, 0))


@pytest.fixture(scope="module")
def support():
    # Two captions per image for the first two images: an image is never shown twice in one prompt.
    rows = [(i, c, 10 * (i + 1)) for i, c in enumerate(CAPTIONS)] + [(0, "one red circle", 10), (1, "one star", 20)]
    return Dataset.from_dict(
        {"image": [solid(v) for *_, v in rows], "caption": [c for _, c, _ in rows], "image_id": [i for i, *_ in rows]}
    )


@pytest.fixture(scope="module")
def queries():
    return Dataset.from_dict(
        {"image": [solid(200 + 10 * i) for i in range(5)], "captions": [[c, c] for c in CAPTIONS]}
    )


def test_prompts_are_examples_then_the_query(support):
    prompts, rows = few_shot_prompts(5, support, shots=3, seed=0)
    for prompt, examples in zip(prompts, rows):
        assert len(examples) == 3 and len({support[r]["image_id"] for r in examples}) == 3
        expected = "".join(f"<image>{support[r]['caption']}<|endofchunk|>" for r in examples) + "<image>"
        assert prompt == expected
    assert few_shot_prompts(5, support, shots=3, seed=0) == (prompts, rows)  # fixed seed: the same examples
    assert few_shot_prompts(5, support, shots=3, seed=1)[1] != rows
    # Nested: the 2-shot examples of a query are the first two of its 4-shot ones.
    two = few_shot_prompts(5, support, shots=2, max_shots=4)[1]
    four = few_shot_prompts(5, support, shots=4, max_shots=4)[1]
    assert all(a == b[:2] for a, b in zip(two, four))
    assert few_shot_prompts(2, support, shots=0) == (["<image>", "<image>"], [[], []])
    with pytest.raises(ValueError, match="support images"):
        few_shot_prompts(1, support, shots=6)


class Recorder(torch.nn.Module):
    """Stands in for a VLM: records each `generate` call and "writes" each query's true caption."""

    config = SimpleNamespace(is_encoder_decoder=False)

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.tokenizer, self.answers, self.calls = tokenizer, list(answers), []

    def generate(self, input_ids, pixel_values, attention_mask, **kwargs):
        self.calls.append({"input_ids": input_ids, "pixel_values": pixel_values, "kwargs": kwargs})
        batch, self.answers = self.answers[: len(input_ids)], self.answers[len(input_ids) :]
        new = self.tokenizer(batch, padding=True, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, new], dim=1)


def test_each_query_gets_its_examples_images_then_its_own(support, queries):
    tokenizer = build_word_tokenizer(caption_vocabulary(), end_of_chunk_token=True)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, do_normalize=False)
    processor = BridgeProcessor(image_processor, tokenizer, num_image_tokens=1)
    shots = (0, 2)
    model = Recorder(tokenizer, CAPTIONS * len(shots))
    scores = evaluate_few_shot(model, processor, queries, support, shots=shots, batch_size=2, progress=False)
    assert set(scores) == {0, 2} and scores[0] > 1.0  # the recorder writes the references
    calls = {0: model.calls[:3], 2: model.calls[3:]}  # 5 queries in batches of 2
    for k in shots:
        prompts, rows = few_shot_prompts(5, support, shots=k, max_shots=2)
        reds, starts = [], []
        for call in calls[k]:
            reds += [round(255 * float(v)) for v in call["pixel_values"][:, 0, 0, 0]]
            markers = (call["input_ids"] == processor.image_token_id).sum(-1).tolist()
            assert markers == [k + 1] * len(call["input_ids"])
            assert call["kwargs"]["eos_token_id"] == [tokenizer.end_of_chunk_token_id, tokenizer.eos_token_id]
            starts.append(call["input_ids"][:, -1].tolist())  # left-padded: every prompt ends with its query marker
        expected = []
        for query, examples in enumerate(rows):
            expected += [10 * (support[r]["image_id"] + 1) for r in examples] + [200 + 10 * query]
        assert reds == expected
        assert all(token == processor.image_token_id for batch in starts for token in batch)
        texts = [tokenizer.decode(ids, skip_special_tokens=False) for call in calls[k] for ids in call["input_ids"]]
        for text, prompt in zip(texts, prompts):
            assert text.replace("<pad>", "").replace(" ", "").endswith(prompt.replace(" ", ""))
