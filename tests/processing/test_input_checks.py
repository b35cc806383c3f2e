"""Bad inputs fail loudly: high-bit-depth / float images are rescaled (not clipped), raw or broken `pixel_values`
are refused, sequences past the language model's context are refused, and dataset paths stay inside the dataset."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import run_docstring_examples
from PIL import Image
from tiny import (
    BOS_ID,
    IMAGE_ID,
    PAD_ID,
    make_tokenizer,
    stage1_config,
    text_config,
    vlm_config,
)
from transformers import SiglipImageProcessorPil

from vlbridge import BridgeVLMForConditionalGeneration, QFormerForImageTextPretraining
from vlbridge.data import load_image_text_folder, load_image_text_jsonl
from vlbridge.processing import BridgeAnyResImageProcessor, BridgeProcessor
from vlbridge.processing.image_utils import to_rgb_image
from vlbridge.trainers import CaptionCollator, ImageTextCollator


pytestmark = pytest.mark.usefixtures("single_thread")

N = 4  # image tokens per image of the tiny Q-Former
# One grey level after SigLIP's normalisation (mean 0.5, std 0.5): 1 / 255 / 0.5.
ONE_LEVEL = 2 / 255 + 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Images of one content at several bit depths
# ---------------------------------------------------------------------------------------------------------------------


def grey_8bit(size: int = 40) -> np.ndarray:
    """A horizontal 0..255 gradient with some structure, `(size, size)` uint8."""
    ramp = np.linspace(0, 255, size).round().astype(np.uint8)
    image = np.tile(ramp, (size, 1))
    image[: size // 4] = 255 - image[: size // 4]
    return image


def same_content(grey: np.ndarray) -> dict[str, object]:
    """The 8-bit image `grey` as every other image a user may pass: 16-bit, 32-bit integer, float, arrays."""
    wide = grey.astype(np.uint16) * 257  # 0..255 -> 0..65535
    return {
        "I;16": Image.fromarray(wide),
        "I;16B": Image.frombytes("I;16B", (grey.shape[1], grey.shape[0]), wide.astype(">u2").tobytes()),
        "I": Image.fromarray(wide.astype(np.int32)),
        "F": Image.fromarray(grey.astype(np.float32) / 255),
        "uint16 array": wide,
        "uint16 HWC array": np.stack([wide] * 3, axis=-1),
        "float CHW array": np.stack([grey.astype(np.float32) / 255] * 3),
        "uint8 tensor HWC": torch.from_numpy(np.stack([grey] * 3, axis=-1)),
        "float tensor": torch.from_numpy(grey.astype(np.float32) / 255),
    }


def test_to_rgb_image_rescales_every_bit_depth_to_the_8bit_values():
    grey = grey_8bit()
    reference = np.asarray(Image.fromarray(grey).convert("RGB")).astype(int)
    for name, image in same_content(grey).items():
        out = to_rgb_image(image)
        assert out.mode == "RGB", name
        assert np.abs(np.asarray(out).astype(int) - reference).max() <= 1, name
    # The plain conversion this replaces turns a 16-bit gradient white.
    assert (np.asarray(Image.fromarray(grey.astype(np.uint16) * 257).convert("L")) == 255).mean() > 0.9
    # Mode I beyond 16 bits: the full 31-bit range.
    full = Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32))
    assert np.asarray(to_rgb_image(full))[0, :, 0].tolist() == [0, 128, 255]


def test_to_rgb_image_docstring_example_runs():
    run_docstring_examples("vlbridge.processing.image_utils")


def test_to_rgb_image_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match=r"\[0, 1\].*Divide 0..255 data by 255"):
        to_rgb_image(Image.fromarray(grey_8bit().astype(np.float32)))  # float 0..255
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_rgb_image(np.full((4, 4, 3), -0.5, dtype=np.float32))  # normalised data
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_image(np.full((4, 4), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="negative values.*uint16"):
        to_rgb_image(Image.fromarray(np.array([[-1, 5]], dtype=np.int32)))
    with pytest.raises(ValueError, match="ambiguous bit depth.*uint8"):
        to_rgb_image(torch.zeros(3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        to_rgb_image(np.zeros((5, 5, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="Expected an image"):
        to_rgb_image(42)


def make_processor() -> BridgeProcessor:
    return BridgeProcessor(
        SiglipImageProcessorPil(size={"height": 32, "width": 32}), make_tokenizer(), num_image_tokens=N
    )


def test_processor_gives_the_8bit_pixel_values_for_16bit_32bit_and_float_images():
    processor = make_processor()
    grey = grey_8bit()
    expected = processor(images=Image.fromarray(grey), text="<image> a", return_tensors="pt")["pixel_values"]
    for name in ("I;16", "I;16B", "I", "F", "uint16 HWC array", "float CHW array", "uint8 tensor HWC"):
        image = same_content(grey)[name]
        got = processor(images=image, text="<image> a", return_tensors="pt")["pixel_values"]
        assert got.shape == expected.shape, name
        assert (got - expected).abs().max() <= ONE_LEVEL, name


def test_anyres_image_processor_called_directly_rescales_16bit_and_float_images():
    image_processor = BridgeAnyResImageProcessor(size={"height": 16, "width": 16})
    grey = grey_8bit()
    expected = image_processor(Image.fromarray(grey).convert("RGB"), return_tensors="pt")["pixel_values"]
    for name in ("I;16", "I", "F"):
        got = image_processor([same_content(grey)[name]], return_tensors="pt")["pixel_values"]
        assert (got - expected).abs().max() <= ONE_LEVEL, name


def test_collators_give_the_8bit_pixel_values_for_16bit_32bit_and_float_images():
    processor = make_processor()
    grey = grey_8bit()
    images = same_content(grey)
    caption = CaptionCollator(processor)
    stage1 = ImageTextCollator(processor.image_processor, processor.tokenizer)
    for collator in (caption, stage1):
        expected = collator([{"image": Image.fromarray(grey), "caption": "a red circle"}])["pixel_values"]
        for name in ("I;16", "I", "F"):
            got = collator([{"image": images[name], "caption": "a red circle"}])["pixel_values"]
            assert (got - expected).abs().max() <= ONE_LEVEL, (type(collator).__name__, name)


# ---------------------------------------------------------------------------------------------------------------------
# pixel_values the model refuses
# ---------------------------------------------------------------------------------------------------------------------


def vlm_inputs(model, batch_size: int = 2, text_len: int = 3):
    n = model.config.num_image_tokens
    text = torch.randint(10, 60, (batch_size, text_len), generator=torch.Generator().manual_seed(0))
    image = torch.full((batch_size, n), IMAGE_ID)
    input_ids = torch.cat([torch.full((batch_size, 1), BOS_ID), image, text], dim=1)  # (B, 1 + N + T)
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, C, H, W)
    return input_ids, pixel_values


def test_vlm_refuses_raw_or_broken_pixel_values_and_stacks_lists():
    torch.manual_seed(0)
    model = BridgeVLMForConditionalGeneration(vlm_config("clip", "qformer", "opt")).eval()
    input_ids, pixel_values = vlm_inputs(model)
    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=pixel_values).logits
        stacked = model(input_ids=input_ids, pixel_values=list(pixel_values)).logits
    torch.testing.assert_close(stacked, expected)

    raw = torch.randint(0, 256, pixel_values.shape, dtype=torch.uint8)
    for dtype in (torch.uint8, torch.int64):
        with pytest.raises(TypeError, match=f"dtype {dtype}.*never rescaled.*BridgeProcessor"):
            model(input_ids=input_ids, pixel_values=raw.to(dtype))
    for bad in (float("nan"), float("inf")):
        broken = pixel_values.clone()
        broken[1, 0, 3, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf.*processor"):
            model(input_ids=input_ids, pixel_values=broken)
    with pytest.raises(ValueError, match="different shapes.*processor"):
        model(input_ids=input_ids, pixel_values=[pixel_values[0], pixel_values[1, :, :16]])
    with pytest.raises(TypeError, match="never rescaled"):  # the public image-feature entry point checks too
        model.get_image_features(raw)


def test_stage1_model_refuses_raw_or_broken_pixel_values():
    torch.manual_seed(0)
    model = QFormerForImageTextPretraining(stage1_config()).eval()
    input_ids = torch.tensor([[BOS_ID, 10, 11], [BOS_ID, 12, 13]])  # (B, T)
    pixel_values = torch.randn(2, 3, 32, 32)  # (B, C, H, W)
    with pytest.raises(TypeError, match="never rescaled"):
        model(pixel_values=(pixel_values * 255).to(torch.uint8), input_ids=input_ids, return_loss=False)
    pixel_values[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(pixel_values=pixel_values, input_ids=input_ids, return_loss=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.get_image_features(pixel_values)


# ---------------------------------------------------------------------------------------------------------------------
# Sequences past the language model's context
# ---------------------------------------------------------------------------------------------------------------------


def test_sequence_past_max_position_embeddings_names_the_fix():
    torch.manual_seed(0)
    model = BridgeVLMForConditionalGeneration(vlm_config("clip", "qformer", "opt")).eval()
    limit = model.config.text_config.max_position_embeddings  # 128 in the tiny OPT
    input_ids, pixel_values = vlm_inputs(model, batch_size=1, text_len=limit)  # 1 + N + limit tokens
    length = input_ids.shape[1]
    with pytest.raises(ValueError, match=rf"{length} tokens long.*at most {limit}.*CaptionCollator.*max_length="):
        model(input_ids=input_ids, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="ChatCollator"):
        model.model(input_ids=input_ids, pixel_values=pixel_values)

    fits, pixel_values = vlm_inputs(model, batch_size=1, text_len=limit - 1 - N)
    with torch.no_grad():
        model(input_ids=fits, pixel_values=pixel_values)  # exactly at the limit is fine
        with pytest.raises(ValueError, match=rf"\(1 new \+ {limit} cached\).*max_new_tokens"):
            model.generate(input_ids=fits, pixel_values=pixel_values, max_new_tokens=3, do_sample=False)


def test_encoder_decoder_without_position_limit_is_not_checked():
    config = vlm_config("clip", "qformer", "t5")
    assert getattr(config.text_config, "max_position_embeddings", None) is None  # T5: relative positions
    model = BridgeVLMForConditionalGeneration(config).eval()
    input_ids, pixel_values = vlm_inputs(model, batch_size=1, text_len=200)
    with torch.no_grad():
        model(input_ids=input_ids, pixel_values=pixel_values, decoder_input_ids=torch.tensor([[PAD_ID]]))


def test_text_config_limit_is_the_language_models():
    assert text_config("opt").max_position_embeddings == 128


# ---------------------------------------------------------------------------------------------------------------------
# Dataset paths stay inside the dataset folder
# ---------------------------------------------------------------------------------------------------------------------


def write_metadata(folder, lines, name="metadata.jsonl"):
    path = folder / name
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture
def dataset_folder(tmp_path):
    """`tmp_path/data` holds `inside.png` and `pics/` (a symlink to a folder elsewhere); `outside.png` is beside it."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    for path in (data / "inside.png", tmp_path / "outside.png", elsewhere / "linked.png"):
        Image.new("RGB", (4, 4), "red").save(path)
    os.symlink(elsewhere, data / "pics", target_is_directory=True)
    return data


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("loader", ["folder", "jsonl"])
def test_image_paths_that_leave_the_dataset_folder_raise(dataset_folder, loader, streaming):
    outside = dataset_folder.parent / "outside.png"
    for bad in ("../outside.png", "pics/../../outside.png", str(outside)):
        lines = [{"file_name": "inside.png", "text": "a"}, {"file_name": bad, "text": "b"}]
        metadata = write_metadata(dataset_folder, lines)
        folder_or_file = dataset_folder if loader == "folder" else metadata
        load = load_image_text_folder if loader == "folder" else load_image_text_jsonl

        with pytest.raises(ValueError, match=rf"Line 2 of .*{bad!r}.*leaves the dataset folder.*allow_outside_paths"):
            load(folder_or_file, streaming=streaming)
        allowed = load(folder_or_file, streaming=streaming, allow_outside_paths=True)
        assert [row["caption"] for row in allowed] == ["a", "b"]

    chats = [
        {
            "images": ["inside.png", "../outside.png"],
            "messages": [
                {"role": "user", "content": "<image><image> which?"},
                {"role": "assistant", "content": "a"},
            ],
        }
    ]
    metadata = write_metadata(dataset_folder, chats, name="chat.jsonl")
    with pytest.raises(ValueError, match="Line 1 .*leaves the dataset folder"):
        load_image_text_jsonl(metadata, streaming=streaming)


def test_symlinked_and_absolute_paths_inside_the_folder_load(dataset_folder):
    lines = [
        {"file_name": "pics/linked.png", "text": "linked"},  # a symlinked image folder inside the dataset is fine
        {"file_name": "./pics/../inside.png", "text": "dotted"},
        {"file_name": str(dataset_folder / "inside.png"), "text": "absolute inside"},
    ]
    write_metadata(dataset_folder, lines)
    dataset, report = load_image_text_folder(dataset_folder, return_report=True)
    assert list(dataset["caption"]) == ["linked", "dotted", "absolute inside"] and report.num_skipped == 0
