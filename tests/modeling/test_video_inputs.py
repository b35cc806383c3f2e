"""Videos through the composite VLM: real frames only, resampled by a Perceiver with media time, in both fusions."""

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor

from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
from vlbridge.data import build_word_tokenizer
from vlbridge.processing import BridgeProcessor


FUSIONS = ("tokens", "gated_cross_attention")


def make_model_and_processor(fusion: str, bridge: dict | None = None):
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(["a", "red", "circle", "video"])
    bridge = bridge or {
        "model_type": "vlbridge_perceiver",
        "hidden_size": 32,
        "num_latents": 4,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "head_dim": 8,
        "num_frames": 4,
    }
    config = BridgeVLMConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        bridge_config=bridge,
        text_config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": len(tokenizer),
        },
        image_token_id=tokenizer.image_token_id,
        image_fusion=fusion,
        cross_attention_every_n_layers=1,
        cross_attention_num_heads=2,
        cross_attention_head_dim=8,
    )
    model = BridgeVLMForConditionalGeneration(config).eval()
    if model.model.gated_cross_attention is not None:
        for block in model.model.gated_cross_attention.values():  # open the gates, so images matter
            block.attention_gate.data.fill_(1.0)
            block.mlp_gate.data.fill_(0.5)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = BridgeProcessor(image_processor, tokenizer, num_image_tokens=config.num_image_tokens)
    return model, processor


def frames(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_padded_video_gets_its_logits_alone(fusion):
    model, processor = make_model_and_processor(fusion)
    long_video, short_video = frames(3, 0), frames(2, 1)
    batch = processor(
        text=["<image> a red circle", "<image> a video"],
        videos=[long_video, short_video],
        return_tensors="pt",
        padding=True,
    )
    assert batch["video_num_frames"].tolist() == [3, 2]
    logits = model(**batch).logits
    alone = model(**processor(text=["<image> a video"], videos=[short_video], return_tensors="pt")).logits
    length = alone.shape[1]
    torch.testing.assert_close(logits[1, :length], alone[0], atol=1e-5, rtol=0)
    # The frames matter: another last frame changes the video's logits.
    other = model(**processor(text=["<image> a video"], videos=[short_video[:1] + frames(1, 7)], return_tensors="pt"))
    assert (other.logits - alone).abs().max() > 1e-6


@pytest.mark.parametrize("fusion", FUSIONS)
def test_one_frame_video_is_the_image(fusion):
    """An image gets the media-time row of frame 0, as a one-frame video does (OpenFlamingo's F = 1)."""
    model, processor = make_model_and_processor(fusion)
    frame = frames(1, 3)
    as_video = model(**processor(text=["<image> a red circle"], videos=[frame], return_tensors="pt")).logits
    as_image = model(**processor(text=["<image> a red circle"], images=frame, return_tensors="pt")).logits
    torch.testing.assert_close(as_video, as_image, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_video_generation_cached_equals_uncached(fusion):
    model, processor = make_model_and_processor(fusion)
    batch = processor(
        text=["<image> a red circle", "<image> a"],
        videos=[frames(3, 0), frames(1, 1)],
        return_tensors="pt",
        padding=True,
    )
    cached = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_video_errors_name_the_fix():
    model, processor = make_model_and_processor("tokens")
    too_long = processor(text=["<image> a"], videos=[frames(5, 0)], return_tensors="pt")
    with pytest.raises(ValueError, match="media-time table holds num_frames=4.*num_frames>=5"):
        model(**too_long)
    batch = processor(text=["<image> a"], videos=[frames(2, 0)], return_tensors="pt")
    with pytest.raises(ValueError, match="pixel_values or pixel_values_videos, not both"):
        model(**batch, pixel_values=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="video_num_frames"):
        model(**{**batch, "video_num_frames": torch.tensor([3])})
    qformer = {
        "model_type": "vlbridge_qformer",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "num_query_tokens": 4,
    }
    model, processor = make_model_and_processor("tokens", qformer)
    with pytest.raises(ValueError, match="Videos need a Perceiver bridge"):
        model(**processor(text=["<image> a"], videos=[frames(2, 0)], return_tensors="pt"))
