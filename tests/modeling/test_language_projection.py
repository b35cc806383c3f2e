"""The VLM's language projection is optional (`use_language_projection=False`, LLaVA-1.5's layout): no module, no
checkpoint keys, the bridge's width checked against the language model's, and every stage, save and load copes."""

import pytest
import torch
from safetensors.torch import load_file
from tiny import IMAGE_ID, bridge_config, text_config, vision_config
from transformers import AutoModelForImageTextToText

from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
from vlbridge.modeling.saving import build_model_card


def config_without_projection(text: str = "llama", bridge_width: int = 32, **kwargs) -> BridgeVLMConfig:
    return BridgeVLMConfig(
        vision_config=vision_config("clip"),
        bridge_config=bridge_config("mlp", hidden_size=bridge_width),
        text_config=text_config(text),
        image_token_id=IMAGE_ID,
        use_language_projection=False,
        **kwargs,
    )


def batch(config, num_images: int = 2):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, 60, (num_images, 3), generator=g)
    input_ids = torch.cat([torch.full((num_images, config.num_image_tokens), IMAGE_ID), text], dim=1)
    return {"input_ids": input_ids, "pixel_values": torch.randn(num_images, 3, 32, 32, generator=g)}


def test_off_means_no_module_and_no_keys():
    model = BridgeVLMForConditionalGeneration(config_without_projection()).eval()
    assert model.model.language_projection is None
    assert not any("language_projection" in key for key in model.state_dict())
    inputs = batch(model.config)
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        bridge_tokens = model.model.bridge(model.model._vision_features(inputs["pixel_values"])).image_tokens
    assert out.logits.shape == (2, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    # The bridge's tokens are what the language model gets, unchanged.
    torch.testing.assert_close(out.image_hidden_states, bridge_tokens, rtol=0, atol=0)
    torch.testing.assert_close(model.get_image_features(inputs["pixel_values"]), bridge_tokens, rtol=0, atol=0)


def test_default_keeps_the_projection_for_old_configs():
    legacy = {
        key: value for key, value in config_without_projection().to_dict().items() if key != "use_language_projection"
    }
    assert BridgeVLMConfig.from_dict(legacy).use_language_projection is True
    assert isinstance(
        BridgeVLMForConditionalGeneration(BridgeVLMConfig.from_dict(legacy)).model.language_projection, torch.nn.Linear
    )


@pytest.mark.parametrize("text,width", [("llama", 32), ("opt", 32)])
def test_a_width_mismatch_is_refused(text, width):
    with pytest.raises(
        ValueError, match=rf"hidden_size is 48 .* width {width}: set bridge_config hidden_size={width}"
    ):
        config_without_projection(text, bridge_width=48)
    # With the projection the widths may differ.
    with_projection = BridgeVLMConfig(
        vision_config=vision_config("clip"),
        bridge_config=bridge_config("mlp", hidden_size=48),
        text_config=text_config(text),
        image_token_id=IMAGE_ID,
    )
    assert BridgeVLMForConditionalGeneration(with_projection).model.language_projection.in_features == 48


def test_opt_embeds_at_word_embed_proj_dim():
    opt = text_config("opt")
    opt.word_embed_proj_dim = 16  # OPT-350m style: embeddings narrower than the hidden states
    kwargs = dict(vision_config=vision_config("clip"), text_config=opt, image_token_id=IMAGE_ID)
    with pytest.raises(ValueError, match="width 16"):
        BridgeVLMConfig(bridge_config=bridge_config("mlp", hidden_size=32), use_language_projection=False, **kwargs)
    config = BridgeVLMConfig(
        bridge_config=bridge_config("mlp", hidden_size=16), use_language_projection=False, **kwargs
    )
    model = BridgeVLMForConditionalGeneration(config).eval()
    with torch.no_grad():
        assert model(**batch(config, 1)).logits.shape[-1] == opt.vocab_size


def test_the_model_checks_the_built_width():
    config = config_without_projection()
    config.bridge_config.hidden_size = 24  # past the config's own check, as a hand-edited config could be
    with pytest.raises(ValueError, match="input embeddings have width 32: set bridge_config hidden_size=32"):
        BridgeVLMForConditionalGeneration(config)


def test_freeze_stages_without_projection():
    model = BridgeVLMForConditionalGeneration(config_without_projection())
    counts = model.freeze("stage2")
    assert "language_projection" not in counts
    assert counts["bridge"] > 0 and counts["language_model"] == counts["vision_tower"] == counts["lm_head"] == 0
    inputs = batch(model.config)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.model.bridge.linear_1.weight.grad.abs().sum() > 0
    counts = model.freeze("finetune")
    assert "language_projection" not in counts and counts["bridge"] > 0 and counts["language_model"] > 0
    assert all(count > 0 for count in model.freeze("full-finetune").values())


def test_save_and_load_without_projection(tmp_path):
    model = BridgeVLMForConditionalGeneration(config_without_projection()).eval()
    model.save_pretrained(tmp_path)
    assert not any("language_projection" in key for key in load_file(tmp_path / "model.safetensors"))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert reloaded.config.use_language_projection is False and reloaded.model.language_projection is None
    state = model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in reloaded.state_dict().items())
    inputs = batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    card = build_model_card(model, "me/llava-like").text
    assert "| bridge |" in card and "language projection" not in card


def test_bf16_casts_at_the_boundary(tmp_path):
    BridgeVLMForConditionalGeneration(config_without_projection()).save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.model.bridge.linear_1.weight.dtype == torch.float32  # the bridge stays fp32
    inputs = batch(model.config)
    with torch.no_grad():
        assert model.get_image_features(inputs["pixel_values"]).dtype == torch.bfloat16
        assert model(**inputs).logits.dtype == torch.bfloat16


def test_lora_saves_only_the_bridge():
    from vlbridge.trainers import language_model_lora_config

    model = BridgeVLMForConditionalGeneration(config_without_projection())
    assert language_model_lora_config(model, r=2).modules_to_save == ["model.bridge"]


def test_stage1_hand_off_without_projection():
    from tiny import stage1_config

    from vlbridge.modeling import QFormerForImageTextPretraining, vlm_from_stage1

    stage1 = QFormerForImageTextPretraining(stage1_config())  # Q-Former width 32 = the tiny Llama's
    vlm = vlm_from_stage1(stage1, text_config("llama"), IMAGE_ID, use_language_projection=False)
    assert vlm.model.language_projection is None
    with torch.no_grad():
        assert vlm(**batch(vlm.config, 1)).logits.shape[0] == 1
