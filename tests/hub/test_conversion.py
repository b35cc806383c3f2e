"""Real BLIP-2 / InstructBLIP checkpoints (tiny, random, made by transformers itself) convert with matching outputs."""

import pytest
import torch
from helpers import NUM_QUERY, make_source
from tiny import BOS_ID, IMAGE_ID, PAD_ID
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
)

from vlbridge import BridgeProcessor, BridgeVLMForConditionalGeneration
from vlbridge.conversion import convert_blip2_checkpoint


def inputs(with_qformer_text: bool):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(10, 60, (2, 5), generator=g)
    input_ids = torch.cat([torch.full((2, NUM_QUERY), IMAGE_ID), torch.full((2, 1), BOS_ID), text], dim=1)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
    }
    if with_qformer_text:
        batch["qformer_input_ids"] = torch.randint(10, 60, (2, 6), generator=g)
        batch["qformer_attention_mask"] = torch.ones(2, 6, dtype=torch.long)
    return batch


@pytest.mark.parametrize(
    "family,text", [("blip2", "opt"), ("blip2", "t5"), ("instructblip", "opt"), ("instructblip", "t5")]
)
def test_converted_checkpoint_matches_transformers(tmp_path, family, text):
    source, source_dir = make_source(tmp_path, family, text)
    convert_blip2_checkpoint(source_dir, tmp_path / "converted")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "converted").eval()
    assert type(model) is BridgeVLMForConditionalGeneration
    assert model.config.num_image_tokens == NUM_QUERY

    batch = inputs(with_qformer_text=family == "instructblip")
    forward = dict(batch)
    if text == "t5":
        forward["labels"] = torch.randint(10, 60, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = source(**forward)
        actual = model(**forward)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-4, rtol=1e-4)

    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=1, min_new_tokens=6, pad_token_id=PAD_ID)
    expected_tokens = source.generate(**batch, **kwargs)
    actual_tokens = model.generate(**batch, **kwargs)
    assert torch.equal(actual_tokens, expected_tokens)


def test_converted_processor(tmp_path):
    _, source_dir = make_source(tmp_path, "instructblip", "opt")
    convert_blip2_checkpoint(source_dir, tmp_path / "converted")
    processor = AutoProcessor.from_pretrained(tmp_path / "converted")
    assert isinstance(processor, BridgeProcessor)
    assert processor.num_image_tokens == NUM_QUERY and processor.qformer_tokenizer is not None
    from tiny import make_images

    out = processor(images=make_images(1), text=["<image> what colour"], return_tensors="pt")
    assert int((out["input_ids"] == IMAGE_ID).sum()) == NUM_QUERY
    assert "qformer_input_ids" in out and out["pixel_values"].shape == (1, 3, 32, 32)


def test_rejects_other_checkpoints(tmp_path):
    from tiny import vlm_config

    BridgeVLMForConditionalGeneration(vlm_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="convert_blip2_checkpoint takes"):
        convert_blip2_checkpoint(tmp_path)
