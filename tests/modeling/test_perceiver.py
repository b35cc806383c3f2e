"""PerceiverResamplerModel: shapes, masking, attention backends, checkpointing, dtype, save / load, and
number-for-number parity with transformers' Flamingo-style `IdeficsPerceiverResampler`."""

import pytest
import torch
from bridge_tester import BridgeTesterMixin
from tiny import bridge_config
from transformers import IdeficsConfig
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

from vlbridge.modeling.modeling_perceiver import PerceiverResamplerModel
from vlbridge.modeling.outputs import BridgeModelOutput


HIDDEN = 32
NUM_LATENTS = 4  # tiny.bridge_config("perceiver")
NUM_LAYERS = 2


def make_model(encoder_hidden_size: int = HIDDEN, attn_implementation: str | None = None, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = bridge_config("perceiver", hidden_size=HIDDEN, encoder_hidden_size=encoder_hidden_size, **overrides)
    return PerceiverResamplerModel._from_config(config, attn_implementation=attn_implementation).eval()


def padding_mask(batch_size: int, num_features: int, lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros(batch_size, num_features, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return mask


class TestPerceiverBridge(BridgeTesterMixin):
    """The contract of every bridge (bridge_tester.py), for a Perceiver with an input projection (features 48 wide)
    and a padded image in the batch."""

    model_class = PerceiverResamplerModel
    hidden_size, encoder_hidden_size = HIDDEN, 48
    num_features, num_output_tokens = 7, NUM_LATENTS
    expected_parameters = (
        "latents",
        "input_proj.weight",
        "layernorm.weight",
        *(f"layers.{i}.attention.q_proj.weight" for i in range(NUM_LAYERS)),
        *(f"layers.{i}.mlp.fc2.weight" for i in range(NUM_LAYERS)),
    )

    def make_model(self) -> PerceiverResamplerModel:
        return make_model(encoder_hidden_size=self.encoder_hidden_size)

    def make_inputs(self) -> dict:
        inputs = super().make_inputs()
        return {**inputs, "image_attention_mask": padding_mask(self.batch_size, self.num_features, [7, 4])}


@pytest.mark.parametrize("num_features", [1, 5, 33])
def test_output_has_num_latents_tokens_whatever_the_number_of_features(num_features):
    model = make_model()
    output = model(torch.randn(3, num_features, HIDDEN), output_hidden_states=True)
    assert isinstance(output, BridgeModelOutput)
    assert output.image_tokens.shape == (3, NUM_LATENTS, HIDDEN)
    assert output.last_hidden_state is output.image_tokens
    assert len(output.hidden_states) == NUM_LAYERS + 1
    assert all(h.shape == (3, NUM_LATENTS, HIDDEN) for h in output.hidden_states)
    as_tuple = model(torch.randn(3, num_features, HIDDEN), return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (3, NUM_LATENTS, HIDDEN)


def test_input_projection_only_when_widths_differ():
    same = make_model(encoder_hidden_size=HIDDEN)
    assert same.input_proj is None
    assert not any(key.startswith("input_proj") for key in same.state_dict())

    wider = make_model(encoder_hidden_size=48)
    assert isinstance(wider.input_proj, torch.nn.Linear)
    assert (wider.input_proj.in_features, wider.input_proj.out_features) == (48, HIDDEN)
    assert wider(torch.randn(2, 6, 48)).image_tokens.shape == (2, NUM_LATENTS, HIDDEN)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_masked_features_do_not_change_the_output(attn_implementation):
    model = make_model(attn_implementation=attn_implementation)
    torch.manual_seed(1)
    image_embeds = torch.randn(2, 9, HIDDEN)
    mask = padding_mask(2, 9, [9, 5])
    reference = model(image_embeds, image_attention_mask=mask).image_tokens

    # Garbage in the padding, even non-finite, must not reach the output.
    garbage = image_embeds.clone()
    garbage[1, 5:] = 1e4 * torch.randn(4, HIDDEN)
    garbage[1, 7] = float("nan")
    torch.testing.assert_close(model(garbage, image_attention_mask=mask).image_tokens, reference, atol=1e-6, rtol=0)

    # Padding is equivalent to absence: the second image alone, unpadded, gives the same tokens.
    alone = model(image_embeds[1:, :5]).image_tokens
    torch.testing.assert_close(alone, reference[1:], atol=1e-5, rtol=1e-5)

    # ... while a change to a real feature does change them (not a constant shift: LayerNorm would remove it).
    changed = image_embeds.clone()
    changed[1, 2] = torch.randn(HIDDEN)
    assert not torch.allclose(model(changed, image_attention_mask=mask).image_tokens[1], reference[1], atol=1e-4)


def test_masked_features_get_zero_attention_weight():
    model = make_model(attn_implementation="eager")
    output = model(torch.randn(2, 6, HIDDEN), image_attention_mask=padding_mask(2, 6, [6, 2]), output_attentions=True)
    assert len(output.attentions) == NUM_LAYERS
    for weights in output.attentions:
        assert weights.shape == (2, 4, NUM_LATENTS, 6 + NUM_LATENTS)  # keys: image features then latents
        assert torch.all(weights[1, :, :, 2:6] == 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, NUM_LATENTS))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_fully_masked_image_gives_finite_tokens_and_gradients(attn_implementation):
    model = make_model(attn_implementation=attn_implementation).train()
    image_embeds = torch.randn(2, 5, HIDDEN, requires_grad=True)
    mask = padding_mask(2, 5, [5, 0])
    tokens = model(image_embeds, image_attention_mask=mask).image_tokens
    assert torch.isfinite(tokens).all()
    tokens.sum().backward()
    assert torch.isfinite(image_embeds.grad).all() and torch.all(image_embeds.grad[1] == 0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_eager_and_sdpa_agree_with_a_mask():
    eager, sdpa = make_model(attn_implementation="eager"), make_model(attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    sdpa.load_state_dict(eager.state_dict())
    image_embeds = torch.randn(3, 11, HIDDEN)
    mask = padding_mask(3, 11, [11, 6, 1])
    torch.testing.assert_close(
        eager(image_embeds, image_attention_mask=mask).image_tokens,
        sdpa(image_embeds, image_attention_mask=mask).image_tokens,
        atol=1e-5,
        rtol=1e-5,
    )


def _gradients(model: PerceiverResamplerModel, image_embeds: torch.Tensor, mask: torch.Tensor) -> dict:
    model.zero_grad()
    model(image_embeds, image_attention_mask=mask).image_tokens.pow(2).mean().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model(encoder_hidden_size=48).train()
    image_embeds, mask = torch.randn(2, 7, 48), padding_mask(2, 7, [7, 3])
    plain = _gradients(model, image_embeds, mask)

    # transformers 5.24 renamed gradient_checkpointing_enable (kept as an alias) to activation_checkpointing_enable.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.is_gradient_checkpointing
    # Checkpointing recomputes each layer in backward: its attention then runs twice per step, not once.
    calls = []
    hooks = [layer.attention.register_forward_hook(lambda *_: calls.append(1)) for layer in model.layers]
    checkpointed = _gradients(model, image_embeds, mask)
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2 * NUM_LAYERS

    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_wrong_inputs_raise_clear_errors():
    model = make_model(encoder_hidden_size=48)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        model(torch.randn(2, 7, HIDDEN))
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        model(torch.randn(7, 48))
    with pytest.raises(ValueError, match="image_attention_mask"):
        model(torch.randn(2, 7, 48), image_attention_mask=torch.ones(2, 6))


# Our key -> IdeficsPerceiverResampler key. The block is the same (LayerNorm on image features and on latents,
# bias-free q from latents, bias-free k / v over cat(image features, latents), scale head_dim ** -0.5, bias-free output
# projection, residual; LayerNorm -> bias-free Linear(4x) -> ReLU -> bias-free Linear, residual; final LayerNorm);
# only the names differ. Idefics has no input projection (widths equal here) and no mask (none passed to it);
# `qk_layer_norms_perceiver=False` is the Flamingo design, which has no q / k LayerNorm.
IDEFICS_KEYS = {
    "latents": "latents",
    "layernorm.{p}": "layer_norm.{p}",
    "layers.{i}.image_layernorm.{p}": "blocks.{i}.0.context_layer_norm.{p}",
    "layers.{i}.latents_layernorm.{p}": "blocks.{i}.0.latents_layer_norm.{p}",
    "layers.{i}.attention.q_proj.weight": "blocks.{i}.0.q_proj.weight",
    "layers.{i}.attention.k_proj.weight": "blocks.{i}.0.k_proj.weight",
    "layers.{i}.attention.v_proj.weight": "blocks.{i}.0.v_proj.weight",
    "layers.{i}.attention.o_proj.weight": "blocks.{i}.0.output_proj.weight",
    "layers.{i}.post_attention_layernorm.{p}": "blocks.{i}.1.ln.{p}",
    "layers.{i}.mlp.fc1.weight": "blocks.{i}.1.fc.weight",
    "layers.{i}.mlp.fc2.weight": "blocks.{i}.1.c_proj.weight",
}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_parity_with_transformers_idefics_perceiver_resampler(attn_implementation):
    idefics_config = IdeficsConfig(
        vision_config={"embed_dim": HIDDEN}, perceiver_config={"qk_layer_norms_perceiver": False}
    )
    torch.manual_seed(0)
    theirs = IdeficsPerceiverResampler(
        idefics_config, embed_dim=HIDDEN, depth=NUM_LAYERS, n_heads=4, head_dim=8, n_latents=NUM_LATENTS
    ).eval()
    # Their LayerNorms start at ones / zeros: randomise them too, so the mapping of every tensor is checked.
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "norm" in name or name.endswith(".ln.weight") or name.endswith(".ln.bias"):
                param.copy_(torch.randn_like(param) * 0.5 + (1.0 if name.endswith("weight") else 0.0))

    ours = make_model(hidden_act="relu", ff_mult=4, attn_implementation=attn_implementation, seed=123)
    their_state = theirs.state_dict()
    mapped = {}
    for i in range(NUM_LAYERS):
        for ours_key, their_key in IDEFICS_KEYS.items():
            for p in ("weight", "bias"):
                mapped[ours_key.format(i=i, p=p)] = their_state[their_key.format(i=i, p=p)]
    assert mapped.keys() == ours.state_dict().keys()
    ours.load_state_dict(mapped, strict=True)

    image_embeds = torch.randn(3, 13, HIDDEN)
    with torch.no_grad():
        expected = theirs(image_embeds)
        # All-ones mask: the masked path must also reproduce the unmasked Flamingo block.
        got = ours(image_embeds, image_attention_mask=torch.ones(3, 13)).image_tokens
        got_unmasked = ours(image_embeds).image_tokens
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_unmasked, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Media-time (frame) embeddings: videos and multi-crop images, as OpenFlamingo's `frame_embs`
# ---------------------------------------------------------------------------------------------------------------------

MAX_FRAMES = 4


def without_frames_twin(model: PerceiverResamplerModel) -> PerceiverResamplerModel:
    """The same Perceiver, weights included, built without a media-time table: the by-hand reference."""
    twin = make_model(
        encoder_hidden_size=model.config.encoder_hidden_size,
        attn_implementation=model.config._attn_implementation,
        num_latents=model.config.num_latents,
    )
    state = {key: value for key, value in model.state_dict().items() if key != "media_time_embeddings"}
    twin.load_state_dict(state, strict=True)
    return twin


class TestPerceiverBridgeWithFrames(BridgeTesterMixin):
    """The bridge contract again with a media-time table: it saves, loads and trains like every other parameter (one
    frame per image here: row 0 is added, and receives the gradient)."""

    model_class = PerceiverResamplerModel
    hidden_size, encoder_hidden_size = HIDDEN, 48
    num_features, num_output_tokens = 7, NUM_LATENTS
    expected_parameters = ("latents", "media_time_embeddings", "input_proj.weight")

    def make_model(self) -> PerceiverResamplerModel:
        return make_model(encoder_hidden_size=self.encoder_hidden_size, num_frames=MAX_FRAMES)


def test_num_frames_none_builds_no_table_and_must_be_positive_when_set():
    assert make_model().media_time_embeddings is None
    assert "media_time_embeddings" not in make_model().state_dict()
    table = make_model(encoder_hidden_size=48, num_frames=MAX_FRAMES).media_time_embeddings
    assert table.shape == (MAX_FRAMES, 48)  # at the vision width: added before input_proj
    for bad in (0, -2):
        with pytest.raises(ValueError, match="num_frames must be None"):
            bridge_config("perceiver", num_frames=bad)


def test_media_time_embeddings_are_initialised_unit_normal_and_not_on_load(tmp_path):
    model = make_model(encoder_hidden_size=48, num_frames=64)
    table = model.media_time_embeddings
    assert torch.isfinite(table).all()
    assert abs(table.std().item() - 1.0) < 0.05 and abs(table.mean().item()) < 0.05  # 64 x 48 unit-normal draws

    with torch.no_grad():
        table.fill_(0.25)  # not what an initialisation would give
    model.save_pretrained(tmp_path)
    loaded = PerceiverResamplerModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.media_time_embeddings, model.media_time_embeddings)


def test_an_image_checkpoint_loads_into_a_video_bridge_with_a_fresh_table(tmp_path):
    """Adding video to a trained image Perceiver: every saved weight is kept, only the new table is initialised."""
    image_model = make_model(encoder_hidden_size=48)
    image_model.save_pretrained(tmp_path)
    video_model = PerceiverResamplerModel.from_pretrained(tmp_path, num_frames=MAX_FRAMES)
    assert video_model.config.num_frames == MAX_FRAMES
    table = video_model.media_time_embeddings
    assert table.shape == (MAX_FRAMES, 48) and torch.isfinite(table).all() and table.std() > 0.5
    for name, tensor in image_model.state_dict().items():
        assert torch.equal(video_model.state_dict()[name], tensor), name


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_video_equals_its_frame_embedded_features_flattened_by_hand(attn_implementation):
    model = make_model(encoder_hidden_size=48, num_frames=MAX_FRAMES, attn_implementation=attn_implementation)
    twin = without_frames_twin(model)
    table = model.media_time_embeddings.detach()
    torch.manual_seed(1)
    video = torch.randn(2, 3, 5, 48)  # (videos, frames, features per frame, width)
    by_hand = (video + table[:3, None, :]).reshape(2, 15, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(video).image_tokens, twin(by_hand).image_tokens, atol=1e-6, rtol=0)

        # A (videos, features) mask applies to every frame; a (videos, frames, features) one frame by frame.
        mask = padding_mask(2, 5, [5, 3])
        got = model(video, image_attention_mask=mask).image_tokens
        expected = twin(by_hand, image_attention_mask=mask.repeat(1, 3)).image_tokens
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        per_frame = mask[:, None, :].repeat(1, 3, 1)
        torch.testing.assert_close(model(video, image_attention_mask=per_frame).image_tokens, got, atol=0, rtol=0)

        # One frame per row (an image) gets row 0, as OpenFlamingo adds `frame_embs[:1]` to images (F = 1).
        image = video[:, 0]
        expected_image = twin(image + table[0]).image_tokens
        torch.testing.assert_close(model(image).image_tokens, expected_image, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(video[:, :1]).image_tokens, expected_image, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_masked_padding_frame_leaves_the_video_as_without_it(attn_implementation):
    model = make_model(encoder_hidden_size=48, num_frames=MAX_FRAMES, attn_implementation=attn_implementation)
    torch.manual_seed(2)
    video = torch.randn(1, 3, 5, 48)
    padded = torch.cat([video, 1e4 * torch.randn(1, 1, 5, 48)], dim=1)  # (1, 4, 5, 48): frame 3 is padding
    padded[0, 3, 2] = float("nan")  # garbage, as in an uninitialised frame buffer
    mask = torch.ones(1, MAX_FRAMES, 5, dtype=torch.long)
    mask[0, 3] = 0
    with torch.no_grad():
        alone = model(video).image_tokens
        got = model(padded, image_attention_mask=mask).image_tokens
    torch.testing.assert_close(got, alone, atol=1e-6, rtol=0)

    # In a batch with a longer video, the short one is the same too.
    longer = torch.randn(1, MAX_FRAMES, 5, 48)
    batch_mask = torch.cat([mask, torch.ones_like(mask)])
    with torch.no_grad():
        batched = model(torch.cat([padded, longer]), image_attention_mask=batch_mask).image_tokens
    torch.testing.assert_close(batched[:1], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched[1:], model(longer).image_tokens.detach(), atol=1e-6, rtol=0)


def test_video_inputs_raise_errors_that_name_the_fix():
    with pytest.raises(ValueError, match=r"no media-time \(frame\) embeddings: set bridge_config num_frames="):
        make_model(encoder_hidden_size=48)(torch.randn(2, 3, 5, 48))

    model = make_model(encoder_hidden_size=48, num_frames=MAX_FRAMES)
    with pytest.raises(
        ValueError,
        match=r"video has 5 frames but the Perceiver's media-time table holds num_frames=4: sample at most 4 "
        r"frames, or build the bridge with num_frames>=5",
    ):
        model(torch.randn(2, 5, 3, 48))
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        model(torch.randn(2, 3, 5, HIDDEN))
    for bad_mask in (torch.ones(2, 3), torch.ones(2, 2, 5), torch.ones(2, 15), torch.ones(2, 3, 5, 1)):
        with pytest.raises(ValueError, match=r"image_attention_mask. must have shape \(batch_size, num_frames"):
            model(torch.randn(2, 3, 5, 48), image_attention_mask=bad_mask)
    with pytest.raises(ValueError, match="encoder_hidden_size"):  # neither an image nor a video
        model(torch.randn(2, 1, 3, 5, 48))


def test_video_save_and_load_round_trip_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    model = make_model(encoder_hidden_size=48, num_frames=MAX_FRAMES)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved["media_time_embeddings"], model.media_time_embeddings)
    loaded = PerceiverResamplerModel.from_pretrained(tmp_path).eval()
    assert loaded.config.num_frames == MAX_FRAMES
    assert torch.equal(loaded.media_time_embeddings, model.media_time_embeddings)
    video, mask = torch.randn(2, 3, 5, 48), torch.ones(2, 3, 5)
    mask[1, 2] = 0
    with torch.no_grad():
        assert torch.equal(loaded(video, image_attention_mask=mask).image_tokens, model(video, mask).image_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Parity with OpenFlamingo's PerceiverResampler (frame embeddings included)
# ---------------------------------------------------------------------------------------------------------------------


def test_openflamingo_key_map_ignores_other_prefixes_and_rejects_unknown_keys():
    from vlbridge.conversion.openflamingo_perceiver import openflamingo_perceiver_state_dict

    state = {
        "perceiver.frame_embs": torch.zeros(4, 8),
        "perceiver.layers.1.1.3.weight": torch.zeros(8, 32),
        "lang_encoder.model.embed_tokens.weight": torch.zeros(3, 8),
    }
    assert set(openflamingo_perceiver_state_dict(state)) == {"media_time_embeddings", "layers.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match="media_time_embs.*resamples each medium on its own"):
        openflamingo_perceiver_state_dict({**state, "perceiver.media_time_embs": torch.zeros(2, 1, 8)})
    with pytest.raises(ValueError, match="not OpenFlamingo Perceiver weights.*prefix"):
        openflamingo_perceiver_state_dict(state, prefix="")


@pytest.mark.parametrize("num_frames", [1, 3])
def test_parity_with_openflamingo_perceiver_resampler(num_frames):
    from openflamingo_reference import load_openflamingo_helpers

    from vlbridge.conversion.openflamingo_perceiver import openflamingo_perceiver_state_dict

    helpers = load_openflamingo_helpers()  # skips, with the reason, without open_flamingo / einops / einops_exts
    torch.manual_seed(0)
    theirs = helpers.PerceiverResampler(
        dim=HIDDEN, depth=NUM_LAYERS, dim_head=8, heads=4, num_latents=8, max_num_frames=MAX_FRAMES
    ).eval()
    # Their LayerNorms start at ones / zeros: randomise them, so that the mapping of every tensor is checked.
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + 0.5 * torch.randn_like(module.weight))
                module.bias.copy_(0.5 * torch.randn_like(module.bias))

    # OpenFlamingo's FeedForward is nn.GELU (erf) = our "gelu"; nn.LayerNorm's eps 1e-5 = our default.
    ours = make_model(num_latents=8, num_frames=MAX_FRAMES, hidden_act="gelu", ff_mult=4, seed=123)
    converted = openflamingo_perceiver_state_dict(theirs.state_dict(), prefix="")
    assert converted.keys() == ours.state_dict().keys()
    ours.load_state_dict(converted, strict=True)

    batch, num_media, num_features = 2, 3, 6
    features = torch.randn(batch, num_media, num_frames, num_features, HIDDEN)  # (b, T, F, v, D)
    with torch.no_grad():
        expected = theirs(features)  # (b, T, n, D)
        # Each medium is resampled on its own: (b, T) -> rows.
        got = ours(features.reshape(batch * num_media, num_frames, num_features, HIDDEN)).image_tokens
        masked = ours(
            features.reshape(batch * num_media, num_frames, num_features, HIDDEN),
            image_attention_mask=torch.ones(batch * num_media, num_frames, num_features),
        ).image_tokens
    torch.testing.assert_close(got.reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)
    if num_frames == 1:  # an image as one row of features takes the same path
        with torch.no_grad():
            image = ours(features.reshape(batch * num_media, num_features, HIDDEN)).image_tokens
        torch.testing.assert_close(image.reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)
