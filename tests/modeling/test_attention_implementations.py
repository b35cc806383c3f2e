"""The composite VLM runs with every attention implementation it declares, its bridges included, and each gives the
eager outputs (flash attention needs the `flash_attn` package and a GPU: skipped where they are absent)."""

import importlib.util

import pytest
import torch

from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration, PerceiverResamplerConfig, QFormerConfig
from vlbridge.modeling import PerceiverResamplerModel, QFormerModel


BRIDGES = {
    "vlbridge_qformer": {
        "model_type": "vlbridge_qformer",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "num_query_tokens": 4,
    },
    "vlbridge_perceiver": {
        "model_type": "vlbridge_perceiver",
        "hidden_size": 32,
        "num_latents": 4,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": 8,
    },
    "vlbridge_mlp": {"model_type": "vlbridge_mlp", "hidden_size": 32, "drop_cls_token": True},
}


def declared_implementations() -> list[str]:
    """What `BridgeVLMPreTrainedModel` says it supports (eager always)."""
    from vlbridge.modeling import BridgeVLMPreTrainedModel as base

    declared = ["eager"]
    declared += ["sdpa"] if base._supports_sdpa else []
    declared += ["flex_attention"] if base._supports_flex_attn else []
    declared += ["flash_attention_2"] if base._supports_flash_attn else []
    return declared


def skip_unless_runnable(implementation: str) -> None:
    if implementation == "flash_attention_2" and (
        importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available()
    ):
        pytest.skip("flash_attention_2 needs the flash_attn package and a CUDA GPU")


def vlm_config(bridge: str) -> BridgeVLMConfig:
    return BridgeVLMConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        bridge_config=BRIDGES[bridge],
        text_config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 100,
        },
        image_token_id=99,
    )


@pytest.mark.parametrize("implementation", declared_implementations())
@pytest.mark.parametrize("bridge", sorted(BRIDGES))
def test_vlm_runs_every_declared_attention_implementation(bridge, implementation, tmp_path):
    skip_unless_runnable(implementation)
    torch.manual_seed(0)
    config = vlm_config(bridge)
    reference = BridgeVLMForConditionalGeneration(config).eval()
    reference.save_pretrained(tmp_path)
    model = BridgeVLMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert model.model.language_model.config._attn_implementation == implementation
    if bridge != "vlbridge_mlp":  # the MLP projector has no attention
        assert model.model.bridge.config._attn_implementation == implementation
    tokens = config.num_image_tokens
    input_ids = torch.tensor([[1] + [99] * tokens + [5, 6, 7], [1, 5] + [99] * tokens + [6, 7]])
    pixel_values = torch.randn(2, 3, 32, 32)
    # No gradient: torch's flex attention has no backward on CPU.
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values).logits
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", declared_implementations())
def test_bridges_mask_padded_features_with_every_implementation(implementation):
    """The masks the bridges build (padded image features; the Q-Former's query / text structure) reach each
    attention implementation in the form it takes."""
    skip_unless_runnable(implementation)
    torch.manual_seed(0)
    features = torch.randn(2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    perceiver = PerceiverResamplerModel(
        PerceiverResamplerConfig(
            hidden_size=32,
            encoder_hidden_size=32,
            num_latents=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=8,
        )
    ).eval()
    qformer = QFormerModel(
        QFormerConfig(
            hidden_size=32,
            encoder_hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_query_tokens=4,
            use_text_input=True,
            vocab_size=50,
        )
    ).eval()
    input_ids = torch.tensor([[2, 5, 6, 7], [2, 8, 0, 0]])
    text_mask = (input_ids != 0).long()
    for bridge in (perceiver, qformer):
        bridge.set_attn_implementation("eager")
        with torch.no_grad():
            if bridge is perceiver:
                expected = bridge(features, image_attention_mask=mask).image_tokens
            else:
                expected = bridge(features, mask, input_ids, text_mask, attention_mode="multimodal_causal")
                expected = expected.last_hidden_state
        bridge.set_attn_implementation(implementation)
        with torch.no_grad():
            if bridge is perceiver:
                got = bridge(features, image_attention_mask=mask).image_tokens
            else:
                got = bridge(features, mask, input_ids, text_mask, attention_mode="multimodal_causal")
                got = got.last_hidden_state
        # Padding rows of the text are compared too: every implementation sees the same (finite) mask.
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
