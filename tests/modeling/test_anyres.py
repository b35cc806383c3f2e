"""Any-res (BLIP-3 / LLaVA-NeXT): best-fit tiling, per-image token counts shared by processor and model, padding tiles
that change nothing, per-tile encoding, the padded-feature mask, generate, collators, and save / load."""

import doctest

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import IMAGE_ID, make_tokenizer, sft_config, vlm_config
from transformers import AutoImageProcessor, AutoProcessor, SiglipImageProcessorPil
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_utils import ChannelDimension

from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
from vlbridge.modeling.anyres import AnyResTiles
from vlbridge.processing import BridgeAnyResImageProcessor, BridgeProcessor, grid_pinpoints_from_grids
from vlbridge.processing.image_processing_anyres import anyres_content_box, anyres_tile_grid
from vlbridge.trainers import CaptionCollator, ChatCollator


pytestmark = pytest.mark.usefixtures("single_thread")

TILE = 32  # tiny.vision_config: image_size 32, patch 8 -> 16 patches + CLS
PATCH = 8
N = 4  # tokens per tile of the tiny Perceiver / Q-Former
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # BLIP-3's grids at a 32-pixel base
PADDING_VALUE = -1.0  # black after the default normalisation, mean = std = 0.5


def image_processor(**kwargs) -> BridgeAnyResImageProcessor:
    return BridgeAnyResImageProcessor(size={"height": TILE, "width": TILE}, **kwargs)


def processor(**kwargs) -> BridgeProcessor:
    return BridgeProcessor(image_processor(**kwargs), make_tokenizer(), num_image_tokens=N)


def build(bridge: str = "perceiver", text: str = "llama", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    config = vlm_config("clip", bridge, text, image_grid_pinpoints=PINPOINTS, **kwargs)
    return BridgeVLMForConditionalGeneration(config).eval()


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def solid(height: int, width: int, value: int = 200) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8))


def image_runs(ids) -> list[int]:
    runs, current = [], 0
    for token in list(ids) + [None]:
        if token == IMAGE_ID:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


# ---------------------------------------------------------------------------------------------------------------------
# Image processor
# ---------------------------------------------------------------------------------------------------------------------


def test_default_pinpoints_are_blip3_grids_of_the_base_size():
    assert BridgeAnyResImageProcessor().image_grid_pinpoints == [
        [384, 768],
        [768, 384],
        [768, 768],
        [1152, 384],
        [384, 1152],
    ]
    assert image_processor().image_grid_pinpoints == PINPOINTS
    assert grid_pinpoints_from_grids(TILE, [(2, 3)]) == [[64, 96]]


# (height, width) -> (rows, columns) of the best-fit canvas among PINPOINTS, worked out by hand: the canvas that
# keeps the most pixels of the image (downscaled to fit), then the one that wastes the least area.
BEST_FIT = {
    (30, 100): (1, 3),  # wide: 96x28 kept on a 32x96 canvas, vs 64x19 on 64x64
    (100, 30): (3, 1),  # tall
    (64, 64): (2, 2),  # square and large enough for the 2x2 canvas
    (200, 200): (2, 2),
    (60, 120): (1, 2),  # 2:1 fits 32x64 exactly; 64x64 keeps as much but wastes more
    (120, 60): (2, 1),
    (20, 20): (1, 2),  # small: every canvas keeps all 400 pixels; the least wasteful one listed first wins
}


@pytest.mark.parametrize("size,grid", list(BEST_FIT.items()))
def test_best_fit_resolution_and_tile_count(size, grid):
    height, width = size
    rows, columns = grid
    ip = image_processor()
    assert anyres_tile_grid(size, PINPOINTS, TILE) == grid
    assert ip.get_number_of_image_patches(height, width) == 1 + rows * columns
    out = ip(noise(height, width), return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 1 + rows * columns, 3, TILE, TILE)
    assert out["image_sizes"].tolist() == [[height, width]]


@pytest.mark.parametrize("size", list(BEST_FIT))
def test_tiles_reassemble_into_the_padded_canvas(size):
    """Tile 0 is the whole image resized; tiles 1.. are the canvas row by row: black outside the content box, the
    image (a solid colour here) inside. This checks the tile order and `anyres_content_box` against the pixels."""
    height, width = size
    rows, columns = BEST_FIT[size]
    pixels = image_processor()(solid(height, width), return_tensors="pt")["pixel_values"][0]  # (tiles, C, T, T)
    content_value = 200 / 255 * 2 - 1
    torch.testing.assert_close(pixels[0], torch.full_like(pixels[0], content_value))
    canvas = pixels[1:].view(rows, columns, 3, TILE, TILE).permute(2, 0, 3, 1, 4).reshape(3, rows * TILE, -1)
    top, left, box_height, box_width = anyres_content_box(size, PINPOINTS)
    # Same box as transformers' own resize arithmetic.
    assert (box_height, box_width) == get_patch_output_size(
        np.zeros((1, height, width)), (rows * TILE, columns * TILE), ChannelDimension.FIRST
    )
    inside = torch.zeros(rows * TILE, columns * TILE, dtype=torch.bool)
    inside[top : top + box_height, left : left + box_width] = True
    assert torch.all(canvas[:, ~inside] == PADDING_VALUE)
    torch.testing.assert_close(canvas[:, inside], torch.full_like(canvas[:, inside], content_value))


def test_image_processor_rejects_bad_settings():
    with pytest.raises(ValueError, match="square tiles"):
        BridgeAnyResImageProcessor(size={"height": 32, "width": 64})
    with pytest.raises(ValueError, match="multiple of the tile size"):
        image_processor(image_grid_pinpoints=[[32, 48]])


# ---------------------------------------------------------------------------------------------------------------------
# Processor <-> model token counts
# ---------------------------------------------------------------------------------------------------------------------


def test_each_image_takes_its_own_token_count_in_processor_and_model():
    proc, model = processor(), build()
    images = [[noise(30, 100), noise(64, 64, 1)], [], [noise(20, 20, 2)]]
    texts = ["<image> a red <image> circle", "what is it", "the <image> blue"]
    out = proc(images=images, text=texts, return_tensors="pt", padding=True)
    expected_tiles = [4, 5, 3]  # BEST_FIT: 1x3, 2x2, 1x2 plus the base view
    assert tuple(out["pixel_values"].shape) == (3, 5, 3, TILE, TILE)  # padded to the most tiles
    assert [image_runs(row) for row in out["input_ids"].tolist()] == [[4 * N, 5 * N], [], [3 * N]]

    sizes = out["image_sizes"].tolist()
    assert proc.num_tiles(sizes) == expected_tiles
    mm = proc._get_num_multimodal_tokens(image_sizes=sizes)
    assert mm.num_image_tokens == [t * N for t in expected_tiles] and mm.num_image_patches == expected_tiles
    # The model derives the same counts from image_sizes alone.
    assert AnyResTiles.from_inputs(model.config, out["pixel_values"], out["image_sizes"]).num_tiles == expected_tiles
    with torch.no_grad():
        result = model(**out)
    assert result.image_hidden_states.shape[:2] == (sum(expected_tiles), N)
    assert result.logits.shape[:2] == out["input_ids"].shape


def test_truncation_that_would_cut_a_tiled_image_raises_with_the_length_that_works():
    proc = processor()
    text = "<image> a red circle"  # 4 tiles x N = 16 image tokens after BOS
    with pytest.raises(ValueError, match=r"keep 9 of its 16 image tokens \(1 image\(s\) tiled.*max_length>=17"):
        proc(images=[noise(30, 100)], text=text, truncation=True, max_length=10)
    kept = proc(images=[noise(30, 100)], text=text, truncation=True, max_length=17)["input_ids"][0]
    assert image_runs(kept) == [4 * N] and len(kept) == 17


def test_model_rejects_inputs_that_do_not_fit():
    proc, model = processor(), build()
    out = proc(images=[noise(30, 100)], text="<image> a", return_tensors="pt")
    with pytest.raises(ValueError, match="need `image_sizes`"):
        model(input_ids=out["input_ids"], pixel_values=out["pixel_values"])
    with pytest.raises(ValueError, match="image_grid_pinpoints=None"):
        torch.manual_seed(0)
        BridgeVLMForConditionalGeneration(vlm_config("clip", "perceiver", "llama"))(**out)
    with pytest.raises(ValueError, match="up to 4 tiles"):
        model(**{**out, "pixel_values": out["pixel_values"][:, :2]})
    with pytest.raises(ValueError, match="do not match"):  # a truncated image
        model(**{**out, "input_ids": out["input_ids"][:, : -N - 2]})
    with pytest.raises(ValueError, match="image_sizes goes with any-res"):
        model(input_ids=out["input_ids"][:, : 1 + N], pixel_values=out["pixel_values"][:, 0], image_sizes=[[3, 3]])
    with pytest.raises(ValueError, match="multiples of the vision tower's image_size"):
        vlm_config("clip", "perceiver", "llama", image_grid_pinpoints=[[32, 48]])


# ---------------------------------------------------------------------------------------------------------------------
# Padding tiles, per-tile encoding, padded features
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bridge", ["perceiver", "qformer"])
def test_padding_tiles_change_nothing(bridge):
    proc, model = processor(), build(bridge)
    out = proc(
        images=[[noise(20, 20)], [noise(64, 64, 1)]],
        text=["<image> a", "<image> b"],
        return_tensors="pt",
        padding=True,
    )
    pixel_values = out["pixel_values"]
    assert pixel_values.shape[1] == 5 and torch.all(pixel_values[0, 3:] == 0)  # 3 real tiles, 2 padding tiles
    garbage = pixel_values.clone()
    garbage[0, 3:] = torch.randn_like(garbage[0, 3:]) * 100
    garbage[0, 4, :, 0, 0] = float("nan")
    with torch.no_grad():
        reference = model(**out).logits
        assert torch.equal(model(**{**out, "pixel_values": garbage}).logits, reference)
        # Padding tiles are not even computed: the batch gives what each image gives alone, unpadded.
        alone = model(**proc(images=[noise(20, 20)], text="<image> a", return_tensors="pt")).logits
    torch.testing.assert_close(alone[0], reference[0, : alone.shape[1]], atol=1e-5, rtol=1e-5)


def test_each_tile_is_encoded_on_its_own():
    """Without the padded-feature mask, a tile's tokens are exactly those of that tile given as a plain image."""
    proc, model = processor(), build(anyres_mask_padding=False)
    out = proc(images=[noise(30, 100), noise(64, 64, 1)], return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(out["pixel_values"], image_sizes=out["image_sizes"])  # (9, N, D)
        singles = [
            model.get_image_features(out["pixel_values"][i, t : t + 1]) for i, n in ((0, 4), (1, 5)) for t in range(n)
        ]
    assert features.shape[0] == 9
    torch.testing.assert_close(features, torch.cat(singles), atol=1e-5, rtol=1e-5)


def test_padded_feature_mask_matches_the_black_padding():
    """The mask the bridge gets hides exactly the patches that are all padding (found from the pixels), keeps CLS
    and the base view, and leaves a tile that is all padding unmasked."""
    pinpoints = [[96, 32], [32, 64]]
    proc = BridgeProcessor(image_processor(image_grid_pinpoints=pinpoints), make_tokenizer(), num_image_tokens=N)
    torch.manual_seed(0)
    model = BridgeVLMForConditionalGeneration(vlm_config("clip", "perceiver", "llama", image_grid_pinpoints=pinpoints))
    # 10x100 lands on the 3x1 canvas as a thin centred strip: tiles 1 and 3 are all padding, tile 2 partly.
    images = [solid(10, 100), solid(30, 50, 90), solid(32, 64, 30)]
    out = proc(images=images, return_tensors="pt")
    captured = {}
    model.model.bridge.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(mask=kwargs["image_attention_mask"]), with_kwargs=True
    )
    with torch.no_grad():
        model.get_image_features(out["pixel_values"], image_sizes=out["image_sizes"])
    tiles = torch.cat([out["pixel_values"][i, :n] for i, n in enumerate(proc.num_tiles(out["image_sizes"]))])
    patches = tiles.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (R, C, 4, 4, PATCH, PATCH)
    content = (patches != PADDING_VALUE).flatten(-2).any(-1).any(1).flatten(1)  # (R, 16): patch holds any content
    content[~content.any(-1)] = True  # all-padding tiles stay unmasked
    mask = captured["mask"]
    assert mask.shape == (tiles.shape[0], 17)
    assert torch.all(mask[:, 0] == 1)  # CLS
    assert torch.equal(mask[:, 1:].bool(), content)
    assert not content.all(), "the test images must leave some patches masked"


# ---------------------------------------------------------------------------------------------------------------------
# Generate, collators, save / load
# ---------------------------------------------------------------------------------------------------------------------


def test_generate_encodes_images_once_and_matches_a_full_forward():
    proc, model = processor(), build()
    proc.tokenizer.padding_side = "left"
    out = proc(
        images=[[noise(30, 100)], [noise(64, 64, 1)]],
        text=["<image> what", "the <image> a red"],
        return_tensors="pt",
        padding=True,
    )
    calls = []
    model.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(1))
    generated = model.generate(**out, max_new_tokens=4, do_sample=False)
    assert len(calls) == 1  # pixel_values and image_sizes are used at prefill only
    # Greedy decoding by hand, re-encoding the images at every step without a cache, picks the same tokens.
    ids, mask = out["input_ids"], out["attention_mask"]
    with torch.no_grad():
        for _ in range(4):
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=out["pixel_values"],
                image_sizes=out["image_sizes"],
                use_cache=False,
            ).logits[:, -1]
            logits[:, IMAGE_ID] = -float("inf")  # generate suppresses the placeholder
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids)


def test_collators_carry_image_sizes_and_check_the_model():
    proc, model = processor(), build()
    caption = CaptionCollator.from_model(model, proc, prompt="a photo of")(
        [{"image": noise(30, 100), "caption": "a red circle"}, {"image": noise(64, 64, 1), "caption": "a square"}]
    )
    assert caption["image_sizes"].tolist() == [[30, 100], [64, 64]]
    assert [image_runs(row) for row in caption["input_ids"].tolist()] == [[4 * N], [5 * N]]
    assert not (caption["labels"] == IMAGE_ID).any()

    chat = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour ?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ],
            "images": [noise(100, 30)],
        },
        {"messages": [{"role": "user", "content": "yes ?"}, {"role": "assistant", "content": "no"}]},
    ]
    batch = ChatCollator.from_model(model, proc)(chat)
    assert batch["image_sizes"].tolist() == [[100, 30]] and batch["pixel_values"].shape[:2] == (1, 4)
    assert [image_runs(row) for row in batch["input_ids"].tolist()] == [[4 * N], []]
    loss = model.train()(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.bridge.latents.grad.abs().sum() > 0

    single_view = BridgeProcessor(
        SiglipImageProcessorPil(size={"height": 32, "width": 32}), make_tokenizer(), num_image_tokens=N
    )
    with pytest.raises(ValueError, match="Only the model uses any-res"):
        ChatCollator.from_model(model, single_view)
    with pytest.raises(ValueError, match="tiles images with"):
        ChatCollator.from_model(model, processor(image_grid_pinpoints=[[64, 64]]))


def test_save_load_round_trip(tmp_path):
    proc = processor(image_grid_pinpoints=[[64, 64], [32, 96]])
    proc.save_pretrained(tmp_path)
    images = [noise(30, 100), noise(50, 50, 1)]
    expected = proc(images=images, text=["<image> a", "<image> b"], return_tensors="pt", padding=True)
    for loaded in (BridgeProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded.image_processor) is BridgeAnyResImageProcessor
        assert loaded.image_processor.image_grid_pinpoints == [[64, 64], [32, 96]]
        got = loaded(images=images, text=["<image> a", "<image> b"], return_tensors="pt", padding=True)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is BridgeAnyResImageProcessor

    model = build()
    model.save_pretrained(tmp_path / "model")
    config = BridgeVLMConfig.from_pretrained(tmp_path / "model")
    assert config.image_grid_pinpoints == PINPOINTS and config.anyres_tile_size == TILE


def test_docstring_examples_run():
    from helpers import MarkdownDocTestParser

    from vlbridge.processing import image_processing_anyres

    finder = doctest.DocTestFinder(parser=MarkdownDocTestParser())
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(image_processing_anyres, image_processing_anyres.__name__):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 5 and result.failed == 0


def test_instructblip_qformer_text_reaches_every_tile():
    """InstructBLIP with any-res: the Q-Former text, one row per sample (the processor's) or one per image (the chat
    collator's), goes to every tile of every image of the sample; both give the same logits."""
    from helpers import make_qformer_tokenizer

    proc = BridgeProcessor(
        image_processor(), make_tokenizer(), qformer_tokenizer=make_qformer_tokenizer(), num_image_tokens=N
    )
    model = build("qformer", use_qformer_text_input=True)
    per_sample = proc(
        images=[[noise(30, 100), noise(64, 64, 1)]], text=["<image> <image> what colour ?"], return_tensors="pt"
    )
    assert per_sample["qformer_input_ids"].shape[0] == 1
    per_image = {
        **per_sample,
        "qformer_input_ids": per_sample["qformer_input_ids"].repeat(2, 1),
        "qformer_attention_mask": per_sample["qformer_attention_mask"].repeat(2, 1),
    }
    captured = []
    model.model.bridge.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["input_ids"]), with_kwargs=True
    )
    with torch.no_grad():
        logits = model(**per_sample).logits
        torch.testing.assert_close(model(**per_image).logits, logits)
    expected = per_sample["qformer_input_ids"].expand(4 + 5, -1)  # 4 + 5 tiles, each with the instruction
    assert all(torch.equal(text_ids, expected) for text_ids in captured) and len(captured) == 2


def test_trl_sft_trainer_carries_image_sizes(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from vlbridge.data import make_synthetic_chat

    rows = make_synthetic_chat({"train": 4}, image_size=48, turns=1)["train"]
    dataset = Dataset.from_list([{"messages": row["messages"], "images": row["images"]} for row in rows])
    args = sft_config(tmp_path, max_steps=1)
    proc, model = processor(), build()
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=proc)
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    assert batch["image_sizes"].tolist() == [[48, 48]] * 4 and batch["pixel_values"].shape[:2] == (4, 5)
    assert not (batch["input_ids"][batch["labels"] != -100] == IMAGE_ID).any()
    trainer.train()
