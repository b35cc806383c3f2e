"""MLPProjectorModel: shapes, CLS drop, mask handling, dtype, save / load, and parity with LLaVA's projector."""

import pytest
import torch
from bridge_tester import BridgeTesterMixin
from tiny import bridge_config, text_config, vision_config
from transformers import LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from vlbridge.modeling.modeling_mlp import MLPProjectorModel
from vlbridge.modeling.outputs import BridgeModelOutput


HIDDEN, ENCODER_HIDDEN = 32, 48


def make_model(seed: int = 0, **overrides) -> MLPProjectorModel:
    torch.manual_seed(seed)
    overrides = {"encoder_hidden_size": ENCODER_HIDDEN, "drop_cls_token": False, **overrides}
    return MLPProjectorModel(bridge_config("mlp", hidden_size=HIDDEN, **overrides)).eval()


class TestMLPBridge(BridgeTesterMixin):
    """The contract of every bridge (bridge_tester.py), for a 3-layer projector that drops the CLS feature: one token
    per remaining feature."""

    model_class = MLPProjectorModel
    hidden_size, encoder_hidden_size = HIDDEN, ENCODER_HIDDEN
    num_features, num_output_tokens = 10, 9
    expected_parameters = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_3.weight", "linear_3.bias")

    def make_model(self) -> MLPProjectorModel:
        return make_model(num_layers=3, drop_cls_token=True)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_shapes_and_layers_for_each_depth(num_layers):
    model = make_model(num_layers=num_layers)
    linears = [getattr(model, f"linear_{i}") for i in range(1, num_layers + 1)]
    assert not hasattr(model, f"linear_{num_layers + 1}")
    assert [(layer.in_features, layer.out_features) for layer in linears] == (
        [(ENCODER_HIDDEN, HIDDEN)] + [(HIDDEN, HIDDEN)] * (num_layers - 1)
    )
    output = model(torch.randn(3, 10, ENCODER_HIDDEN), output_hidden_states=True)
    assert isinstance(output, BridgeModelOutput)
    assert output.image_tokens.shape == (3, 10, HIDDEN)
    assert output.last_hidden_state is output.image_tokens
    assert len(output.hidden_states) == num_layers + 1 and output.hidden_states[-1] is output.image_tokens
    assert output.attentions is None
    assert model(torch.randn(3, 10, ENCODER_HIDDEN), return_dict=False)[0].shape == (3, 10, HIDDEN)


def test_cls_drop_removes_exactly_the_first_token():
    keep, drop = make_model(drop_cls_token=False), make_model(drop_cls_token=True)
    drop.load_state_dict(keep.state_dict())
    image_embeds = torch.randn(2, 10, ENCODER_HIDDEN)
    kept, dropped = keep(image_embeds).image_tokens, drop(image_embeds).image_tokens
    assert dropped.shape == (2, 9, HIDDEN)
    assert torch.equal(dropped, kept[:, 1:])
    # The CLS feature no longer reaches any token.
    other_cls = image_embeds.clone()
    other_cls[:, 0] = torch.randn(2, ENCODER_HIDDEN)
    assert torch.equal(drop(other_cls).image_tokens, dropped)
    assert drop.config.num_output_tokens(10) == 9


def test_mask_is_checked_but_does_not_change_the_tokens():
    model = make_model(drop_cls_token=True)
    image_embeds = torch.randn(2, 10, ENCODER_HIDDEN)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    # One token per feature, padding included: the language model's attention mask is where padding is hidden.
    assert torch.equal(model(image_embeds, image_attention_mask=mask).image_tokens, model(image_embeds).image_tokens)
    with pytest.raises(ValueError, match="image_attention_mask"):
        model(image_embeds, image_attention_mask=mask[:, 1:])


def test_wrong_inputs_raise_clear_errors():
    model = make_model(drop_cls_token=True)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        model(torch.randn(2, 10, HIDDEN))
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        model(torch.randn(10, ENCODER_HIDDEN))
    with pytest.raises(ValueError, match="drop_cls_token"):
        model(torch.randn(2, 1, ENCODER_HIDDEN))


@pytest.mark.parametrize("drop_cls_token", [False, True])
def test_parity_with_transformers_llava_projector(drop_cls_token):
    llava_config = LlavaConfig(
        vision_config=vision_config("clip", hidden_size=ENCODER_HIDDEN),
        text_config=text_config("llama", hidden_size=HIDDEN),
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    theirs = LlavaMultiModalProjector(llava_config).eval()
    with torch.no_grad():  # their biases start at zero: randomise them so the bias mapping is checked too
        theirs.linear_1.bias.normal_()
        theirs.linear_2.bias.normal_()
    ours = make_model(seed=1, num_layers=2, hidden_act="gelu", drop_cls_token=drop_cls_token)
    # LLaVA's `multi_modal_projector.linear_{1,2}.*` keys load 1:1.
    ours.load_state_dict(theirs.state_dict(), strict=True)

    image_embeds = torch.randn(2, 17, ENCODER_HIDDEN)
    # LLaVA's "default" feature selection drops the CLS feature before its projector.
    expected = theirs(image_embeds[:, 1:] if drop_cls_token else image_embeds)
    torch.testing.assert_close(ours(image_embeds).image_tokens, expected, atol=1e-6, rtol=1e-6)
