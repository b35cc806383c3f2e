"""What every bridge must do, checked once for all of them (the habit of transformers' `ModelTesterMixin`).

A bridge's test class inherits `BridgeTesterMixin`, sets the class attributes below and, if its bridge needs more
than a batch of image features (a mask, Q-Former text), overrides `make_inputs`:

    class TestMyBridge(BridgeTesterMixin):
        model_class = MyBridgeModel
        hidden_size, encoder_hidden_size, num_features, num_output_tokens = 32, 48, 7, 4
        expected_parameters = ("latents", "layers.1.attention.q_proj.weight")

        def make_model(self):
            return MyBridgeModel(my_config()).eval()

Not a test module itself (its name does not start with `test_`, nor does the mixin's with `Test`): pytest collects
the mixin's tests once per inheriting class, under that class's name.
"""

from __future__ import annotations

import torch
from transformers import AutoModel, PreTrainedModel

from vlbridge.modeling.outputs import BridgeModelOutput


class BridgeTesterMixin:
    """The contract of a bridge: image features `(batch, num_features, encoder_hidden_size)` in, a `BridgeModelOutput`
    of `(batch, num_output_tokens, hidden_size)` image tokens out; trainable end to end; saved and loaded bit for bit,
    also through `AutoModel`; fp32 whatever the dtype of the features."""

    model_class: type[PreTrainedModel]
    hidden_size: int  # width of the image tokens (the language model's side)
    encoder_hidden_size: int  # width of the image features (the vision tower's side)
    num_features: int = 7  # image features per image in `make_inputs`
    num_output_tokens: int  # image tokens per image for `num_features` features
    batch_size: int = 2
    # Parameter names that must be among those the gradient check covers (so that it cannot pass on a subset).
    expected_parameters: tuple[str, ...] = ()

    def make_model(self) -> PreTrainedModel:
        """A seeded fp32 bridge in eval mode, every parameter of which affects the output."""
        raise NotImplementedError

    def make_inputs(self) -> dict:
        """Keyword arguments of a forward pass; `image_embeds` is `(batch_size, num_features, encoder_hidden_size)`."""
        generator = torch.Generator().manual_seed(1)
        shape = (self.batch_size, self.num_features, self.encoder_hidden_size)
        return {"image_embeds": torch.randn(shape, generator=generator)}

    # -----------------------------------------------------------------------------------------------------------------

    def test_forward_gives_a_bridge_output_of_num_output_tokens(self):
        """Guards the shape the VLM relies on: it splices `num_output_tokens` tokens of width `hidden_size` per image
        into the language model's input, and sizes the run of image tokens by `config.num_output_tokens`."""
        model = self.make_model()
        inputs = self.make_inputs()
        expected = (self.batch_size, self.num_output_tokens, self.hidden_size)
        assert inputs["image_embeds"].shape == (self.batch_size, self.num_features, self.encoder_hidden_size)
        assert model.config.num_output_tokens(self.num_features) == self.num_output_tokens

        with torch.no_grad():
            image_only = model(image_embeds=inputs["image_embeds"])
            as_tuple = model(image_embeds=inputs["image_embeds"], return_dict=False)
            full = model(**inputs)
        assert isinstance(image_only, BridgeModelOutput)
        assert image_only.last_hidden_state.shape == expected
        assert image_only.image_tokens.shape == expected
        assert torch.equal(image_only.image_tokens, image_only.last_hidden_state)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], image_only.image_tokens)
        assert isinstance(full, BridgeModelOutput) and full.image_tokens.shape == expected
        assert torch.isfinite(full.image_tokens).all()

    def test_save_and_load_are_bit_exact(self, tmp_path):
        """Guards `save_pretrained` / `from_pretrained`: the same config, every tensor of the state dict bit-equal
        (nothing missing, renamed or re-initialised on load), and so the same outputs."""
        model = self.make_model()
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
        loaded = self.model_class.from_pretrained(tmp_path).eval()
        assert type(loaded) is self.model_class

        def config_dict(m):
            return m.config.to_diff_dict() | {"_name_or_path": ""}

        assert config_dict(loaded) == config_dict(model)
        state, loaded_state = model.state_dict(), loaded.state_dict()
        assert loaded_state.keys() == state.keys()
        for name, tensor in state.items():
            assert loaded_state[name].dtype == tensor.dtype and torch.equal(loaded_state[name], tensor), name

        inputs = self.make_inputs()
        with torch.no_grad():
            ours, theirs = model(**inputs), loaded(**inputs)
        assert torch.equal(theirs.image_tokens, ours.image_tokens)
        assert torch.equal(theirs.last_hidden_state, ours.last_hidden_state)

    def test_auto_model_loads_the_saved_bridge_as_its_own_class(self, tmp_path):
        """Guards the `AutoModel` registration (importing `vlbridge` registers every bridge): a saved bridge comes back
        as the same class with the same weights, as the VLM's `from_pretrained` of a bridge folder needs."""
        model = self.make_model()
        model.save_pretrained(tmp_path)
        auto_loaded = AutoModel.from_pretrained(tmp_path)
        assert type(auto_loaded) is self.model_class
        auto_state = auto_loaded.state_dict()
        assert auto_state.keys() == model.state_dict().keys()
        assert all(torch.equal(auto_state[name], tensor) for name, tensor in model.state_dict().items())

    def test_gradients_reach_every_parameter_and_the_features(self):
        """Guards training through the bridge: every trainable parameter gets a finite, non-zero gradient (none is
        detached, unused or cut off by a mask), and so does every image's features (the vision tower trains too)."""
        torch.manual_seed(0)
        model = self.make_model().train()
        inputs = self.make_inputs()
        image_embeds = inputs["image_embeds"].clone().requires_grad_()
        output = model(**{**inputs, "image_embeds": image_embeds})
        output.last_hidden_state.pow(2).mean().backward()

        trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
        assert trainable, "the bridge has no trainable parameter"
        missing = [name for name in self.expected_parameters if name not in trainable]
        assert not missing, f"expected trainable parameters not found: {missing}"
        no_gradient = [name for name, param in trainable.items() if param.grad is None or not param.grad.any()]
        assert not no_gradient, f"no gradient reached: {no_gradient}"
        assert all(torch.isfinite(param.grad).all() for param in trainable.values())

        assert image_embeds.grad is not None and torch.isfinite(image_embeds.grad).all()
        per_image = image_embeds.grad.abs().sum(dim=(1, 2))
        assert (per_image > 0).all(), f"no gradient reached the features of image(s) {(per_image == 0).nonzero()}"

    def test_bf16_features_into_an_fp32_bridge(self):
        """Guards mixed-precision use (a bf16 vision tower before an fp32 bridge): the features are cast once, on
        entry, so the output is fp32, finite and exactly that of the upcast features; the weights stay fp32; under
        bf16 autocast the output stays finite."""
        model = self.make_model()
        inputs = self.make_inputs()
        bf16 = inputs["image_embeds"].to(torch.bfloat16)
        with torch.no_grad():
            output = model(**{**inputs, "image_embeds": bf16})
            reference = model(**{**inputs, "image_embeds": bf16.float()})
            with torch.autocast("cpu", dtype=torch.bfloat16):
                autocast = model(**{**inputs, "image_embeds": bf16})
        assert all(param.dtype == torch.float32 for param in model.parameters())
        for name in ("image_tokens", "last_hidden_state"):
            assert output[name].dtype == torch.float32, name
            assert torch.isfinite(output[name]).all(), name
            torch.testing.assert_close(output[name], reference[name], atol=0, rtol=0, msg=name)
        assert torch.isfinite(autocast.image_tokens.float()).all()
