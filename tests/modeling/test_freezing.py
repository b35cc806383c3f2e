"""`freeze`: every parameter it leaves trainable receives a gradient, and nothing else is counted as trainable."""

import logging

import pytest
import torch
from tiny import BOS_ID, IMAGE_ID, vlm_config

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.modeling.freezing import FREEZE_STAGES


def forward_backward(model: BridgeVLMForConditionalGeneration) -> None:
    tokens = model.config.num_image_tokens
    input_ids = torch.tensor([[BOS_ID] + [IMAGE_ID] * tokens + [12, 13, 14]] * 2)
    labels = input_ids.masked_fill(input_ids == IMAGE_ID, -100)
    model(input_ids=input_ids, pixel_values=torch.randn(2, 3, 32, 32), labels=labels).loss.backward()


@pytest.mark.parametrize("stage", sorted(FREEZE_STAGES))
@pytest.mark.parametrize("vision", ["clip", "siglip"])
@pytest.mark.parametrize("bridge", ["qformer", "mlp"])
@pytest.mark.parametrize("vision_feature_layer", [None, -2])
def test_every_trainable_parameter_gets_a_gradient(stage, vision, bridge, vision_feature_layer):
    torch.manual_seed(0)
    config = vlm_config(vision, bridge, "opt", vision_feature_layer=vision_feature_layer)
    model = BridgeVLMForConditionalGeneration(config).train()
    counts = model.freeze(stage)
    if stage == "frozen":
        assert not any(p.requires_grad for p in model.parameters()) and not any(counts.values())
        return
    forward_backward(model)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert not [name for name, p in trainable.items() if p.grad is None]
    tower = model.model.vision_tower
    assert counts["vision_tower"] == sum(p.numel() for p in tower.parameters() if p.requires_grad)
    if stage in ("stage2", "finetune", "full-finetune"):
        assert counts["bridge"] > 0


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_full_finetune_leaves_unreached_vision_parameters_frozen_and_says_so(vision, caplog):
    model = BridgeVLMForConditionalGeneration(vlm_config(vision, "qformer", "opt", vision_feature_layer=-2))
    with caplog.at_level(logging.INFO, logger="vlbridge.modeling.freezing"):
        counts = model.freeze("full-finetune")
    tower = model.model.vision_tower
    # Names relative to the tower's transformer, whether or not the tower nests it under `vision_model.`.
    frozen = {name.removeprefix("vision_model.") for name, p in tower.named_parameters() if not p.requires_grad}
    # hidden_states[-2] of a 2-layer tower is the output of layer 0: layer 1 and everything after it is unreached.
    assert any(name.startswith("encoder.layers.1.") for name in frozen)
    assert not any(name.startswith("encoder.layers.0.") for name in frozen)
    assert "post_layernorm.weight" in frozen
    if vision == "siglip":
        assert "head.probe" in frozen
    assert counts["vision_tower"] == sum(p.numel() for p in tower.parameters() if p.requires_grad) > 0
    line = next(record.getMessage() for record in caplog.records if "vision_tower" in record.getMessage())
    assert "stay frozen" in line and "encoder.layers.1" in line and "post_layernorm" in line


def test_full_finetune_with_last_hidden_state_keeps_the_encoder_trainable():
    # CLIP's last_hidden_state is taken before post_layernorm, which only feeds the pooled output.
    model = BridgeVLMForConditionalGeneration(vlm_config("clip", "mlp", "opt"))
    model.freeze("full-finetune")
    tower = model.model.vision_tower
    frozen = {name.removeprefix("vision_model.") for name, p in tower.named_parameters() if not p.requires_grad}
    assert frozen == {"post_layernorm.weight", "post_layernorm.bias"}
