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


def declared_implementations(bridge: str) -> list[str]:
    """What the composite built with `bridge` says it supports (eager always)."""
    model = BridgeVLMForConditionalGeneration(vlm_config(bridge))
    declared = ["eager"]
    declared += ["sdpa"] if model._supports_sdpa else []
    declared += ["flex_attention"] if model._supports_flex_attn else []
    declared += ["flash_attention_2"] if model._supports_flash_attn else []
    return declared


def declared_pairs() -> list[tuple[str, str]]:
    return [
        (bridge, implementation) for bridge in sorted(BRIDGES) for implementation in declared_implementations(bridge)
    ]


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


@pytest.mark.parametrize(("bridge", "implementation"), declared_pairs())
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


def bridge_implementations() -> list[str]:
    """What both attending bridges declare."""
    declared = ["eager"]
    for flag, implementation in (
        ("sdpa", "sdpa"),
        ("flex_attn", "flex_attention"),
        ("flash_attn", "flash_attention_2"),
    ):
        if all(getattr(bridge, f"_supports_{flag}") for bridge in (QFormerModel, PerceiverResamplerModel)):
            declared.append(implementation)
    return declared


@pytest.mark.parametrize("implementation", bridge_implementations())
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


def test_composite_declares_flash_only_when_its_bridge_can():
    """Flash attention takes padding-only masks in half precision: the fp32 Q-Former and Perceiver cannot run it, so a
    composite with them does not declare it; the MLP projector has no attention, so a LLaVA-style composite does."""
    assert not QFormerModel._supports_flash_attn and not PerceiverResamplerModel._supports_flash_attn
    for bridge in ("vlbridge_qformer", "vlbridge_perceiver"):
        assert "flash_attention_2" not in declared_implementations(bridge)
    assert "flash_attention_2" in declared_implementations("vlbridge_mlp")


@pytest.mark.parametrize("bridge", ["vlbridge_qformer", "vlbridge_perceiver"])
def test_flash_request_names_the_per_part_form(bridge, tmp_path):
    BridgeVLMForConditionalGeneration(vlm_config(bridge)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r'"bridge_config": "sdpa"') as error:
        BridgeVLMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    assert bridge in str(error.value) and '"text_config": "flash_attention_2"' in str(error.value)


def test_per_part_attention_implementations(tmp_path):
    """The per-part form the error names reaches each part (eager / sdpa here: flash needs a GPU)."""
    torch.manual_seed(0)
    config = vlm_config("vlbridge_qformer")
    reference = BridgeVLMForConditionalGeneration(config).eval()
    reference.save_pretrained(tmp_path)
    parts = {"text_config": "eager", "vision_config": "eager", "bridge_config": "sdpa"}
    model = BridgeVLMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=parts).eval()
    assert model.model.language_model.config._attn_implementation == "eager"
    assert model.model.vision_tower.config._attn_implementation == "eager"
    assert model.model.bridge.config._attn_implementation == "sdpa"
    input_ids = torch.tensor([[1] + [99] * config.num_image_tokens + [5, 6]])
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values).logits
        torch.testing.assert_close(
            model(input_ids=input_ids, pixel_values=pixel_values).logits, expected, atol=1e-5, rtol=0
        )
