"""Gated cross-attention fusion (Flamingo): the VLM starts as its language model, text reads only the images it may
read, batching / padding / caching / checkpointing change nothing, and the blocks train, save, load and take LoRA.

Each `<image>` is one marker token here; the Perceiver's tokens reach the text through tanh-gated blocks run before
decoder layers `i` with `(i + 1) % cross_attention_every_n_layers == 0`. Where a property needs the images to matter,
the gates are set to non-zero values (at initialisation they are 0 and the images change nothing).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
from vlbridge.modeling.compat import CACHE_KEY
from vlbridge.modeling.gated_cross_attention import GatedCrossAttentionBlock, find_decoder_layers


VOCAB_SIZE = 100
COMMON_TEXT = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
TEXT_CONFIGS = {
    "llama": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "opt": dict(
        model_type="opt",
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_head=4, n_positions=64),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "phi3": dict(
        model_type="phi3",
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
}
VISION_CONFIG = dict(
    model_type="clip_vision_model",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=16,
    patch_size=8,
)
PERCEIVER_CONFIG = dict(
    model_type="vlbridge_perceiver",
    hidden_size=16,
    num_latents=3,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=8,
)


def gated_config(text: str = "llama", num_layers: int = 2, every: int = 1, **kwargs) -> BridgeVLMConfig:
    """CLIP (16 px, 4 patches) -> Perceiver (3 latents, width 16) -> `text` LM (width 32, `num_layers` layers)."""
    options = dict(
        vision_config=VISION_CONFIG,
        bridge_config=PERCEIVER_CONFIG,
        text_config={**TEXT_CONFIGS[text], "num_hidden_layers": num_layers, **COMMON_TEXT},
        image_token_id=IMAGE_ID,
        image_fusion="gated_cross_attention",
        cross_attention_every_n_layers=every,
        cross_attention_num_heads=2,
        cross_attention_head_dim=8,
        cross_attention_ff_mult=2,
    )
    return BridgeVLMConfig(**{**options, **kwargs})


def build(text: str = "llama", seed: int = 0, gates: float | None = None, **kwargs):
    """The tiny gated VLM in eval mode; with `gates`, every gate set to it and the blocks' value / output projections
    scaled up (their 0.02-std init lets an image move the text by ~1e-5 only), so that the images visibly matter."""
    torch.manual_seed(seed)
    model = BridgeVLMForConditionalGeneration(gated_config(text, **kwargs)).eval()
    if gates is not None:
        set_gates(model, gates)
        with torch.no_grad():
            for block in blocks(model):
                block.attention.v_proj.weight.mul_(10)
                block.attention.o_proj.weight.mul_(10)
    return model


def blocks(model) -> list[GatedCrossAttentionBlock]:
    return list(model.model.gated_cross_attention.values())


@torch.no_grad()
def set_gates(model, value: float) -> None:
    """Opens every gate (the attention and feed-forward ones), so that the images reach the text."""
    for block in blocks(model):
        block.attention_gate.fill_(value)
        block.mlp_gate.fill_(value)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, pixel_values=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values, **kwargs).logits


# BOS, text, image 1, text, image 2, text: positions [0, 2) read nothing, [2, 5) image 1, [5, 8) image 2 (immediate).
TWO_IMAGES = torch.tensor([[BOS_ID, 10, IMAGE_ID, 11, 12, IMAGE_ID, 13, 14]])
BEFORE, BETWEEN, AFTER = slice(0, 2), slice(2, 5), slice(5, 8)


def plain_language_model(model) -> nn.Module:
    """`AutoModelForCausalLM` of the VLM's text config holding the VLM's language model and head weights."""
    lm = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    prefix = lm.base_model_prefix
    weights = {
        f"{prefix}.{key.removeprefix('model.language_model.')}": value
        for key, value in model.state_dict().items()
        if key.startswith("model.language_model.")
    }
    weights["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    assert not unexpected and not [key for key in missing if key != "lm_head.weight"], (missing, unexpected)
    return lm


# ---------------------------------------------------------------------------------------------------------------------
# 1-3: the plain language model at initialisation; who reads which image
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["llama", "opt", "gpt2", "qwen2", "phi3"])
def test_starts_as_the_plain_language_model_bit_exact(tmp_path, text):
    model = build(text)
    lm = plain_language_model(model)
    pixel_values = images(2)
    # The language model's keys inside the VLM are its own, under `model.language_model.` (no renaming).
    inside = {
        k.removeprefix("model.language_model.") for k in model.state_dict() if k.startswith("model.language_model.")
    }
    assert inside == set(AutoModel.from_config(model.config.text_config).state_dict())
    assert inside == {k.removeprefix(f"{lm.base_model_prefix}.") for k in lm.state_dict() if k != "lm_head.weight"}

    # Gates at 0: the images are in the text, yet every logit is the plain language model's, bit for bit.
    vlm_logits = logits(model, TWO_IMAGES, pixel_values)
    with torch.no_grad():
        lm_logits = lm(input_ids=TWO_IMAGES).logits
    assert torch.equal(vlm_logits, lm_logits)

    # The blocks are wired into this family's decoder layers: opened gates change the text after the first image.
    set_gates(model, 1.0)
    opened = logits(model, TWO_IMAGES, pixel_values)
    assert not torch.allclose(opened[:, BETWEEN], lm_logits[:, BETWEEN])
    assert not torch.allclose(opened[:, AFTER], lm_logits[:, AFTER])
    set_gates(model, 0.0)

    # The saved VLM's language-model weights load as the plain language model, alone.
    model.save_pretrained(tmp_path / "vlm")
    saved = load_file(tmp_path / "vlm" / "model.safetensors")
    lm_weights = {
        f"{lm.base_model_prefix}.{key.removeprefix('model.language_model.')}": value
        for key, value in saved.items()
        if key.startswith("model.language_model.")
    }
    if "lm_head.weight" in saved:  # absent when tied to the input embeddings
        lm_weights["lm_head.weight"] = saved["lm_head.weight"]
    (tmp_path / "lm").mkdir()
    save_file(lm_weights, tmp_path / "lm" / "model.safetensors", metadata={"format": "pt"})
    model.config.text_config.save_pretrained(tmp_path / "lm")
    alone, info = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.equal(alone.eval()(input_ids=TWO_IMAGES).logits, vlm_logits)


@pytest.mark.parametrize("text", ["llama", "opt", "gpt2", "qwen2", "phi3"])
def test_text_before_the_first_image_reads_nothing_visual(text):
    model = build(text, gates=1.0)
    a = logits(model, TWO_IMAGES, images(2, seed=0))
    b = logits(model, TWO_IMAGES, images(2, seed=1))
    assert torch.equal(a[:, BEFORE], b[:, BEFORE])
    assert not torch.allclose(a[:, BETWEEN], b[:, BETWEEN])


def block_zero_output(model, pixel_values) -> torch.Tensor:
    """Output of the block before decoder layer 0, which sees only the embeddings (no mixing across tokens)."""
    captured = []
    handle = model.model.gated_cross_attention["0"].register_forward_hook(
        lambda module, args, output: captured.append(output[0])
    )
    try:
        logits(model, TWO_IMAGES, pixel_values)
    finally:
        handle.remove()
    assert len(captured) == 1
    return captured[0]


@pytest.mark.parametrize("immediate", [True, False])
def test_which_images_a_token_reads(immediate):
    model = build(every=1, gates=1.0, only_attend_immediate_media=immediate)
    pixel_values = images(2)
    moved = pixel_values.clone()
    moved[0] = images(1, seed=7)[0]  # image 1 only
    a, b = block_zero_output(model, pixel_values), block_zero_output(model, moved)
    change = (a - b).abs().amax(-1)[0]  # (T,) largest change of each token's output
    assert torch.equal(a[:, BEFORE], b[:, BEFORE])
    assert change[BETWEEN].min() > 1e-4, change  # every token from image 1 to image 2 reads image 1
    if immediate:  # after image 2, only image 2 is read
        assert torch.equal(a[:, AFTER], b[:, AFTER]), change
    else:  # every earlier image is read
        assert change[AFTER].min() > 1e-4, change


# ---------------------------------------------------------------------------------------------------------------------
# 4-5: batching, padding, generation with and without the KV cache
# ---------------------------------------------------------------------------------------------------------------------

# Samples with 0, 1 and 3 images, of different lengths.
SAMPLES = [
    [BOS_ID, 10, 11, 12],
    [BOS_ID, IMAGE_ID, 13, 14, 15, 16],
    [BOS_ID, IMAGE_ID, 17, IMAGE_ID, 18, IMAGE_ID, 19],
]
SAMPLE_IMAGES = [0, 1, 3]


def pad(samples: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in samples)
    rows, masks = [], []
    for sample in samples:
        padding = [PAD_ID] * (length - len(sample))
        rows.append(sample + padding if side == "right" else padding + sample)
        ones, zeros = [1] * len(sample), [0] * len(padding)
        masks.append(ones + zeros if side == "right" else zeros + ones)
    return torch.tensor(rows), torch.tensor(masks)


@pytest.mark.parametrize("text", ["llama", "opt"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_mixed_image_counts_batch_equals_each_sample_alone(text, side):
    model = build(text, seed=1, gates=1.0, num_layers=2, every=1)
    pixel_values = images(sum(SAMPLE_IMAGES), seed=3)  # in marker order over the batch
    per_sample = torch.split(pixel_values, SAMPLE_IMAGES)
    input_ids, attention_mask = pad(SAMPLES, side)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batched = logits(model, input_ids, pixel_values, attention_mask=attention_mask, position_ids=position_ids)
    for index, (sample, sample_images) in enumerate(zip(SAMPLES, per_sample)):
        alone = logits(model, torch.tensor([sample]), sample_images if len(sample_images) else None)
        real = attention_mask[index].bool()
        torch.testing.assert_close(batched[index, real], alone[0], atol=1e-5, rtol=0, msg=f"sample {index}")
    # The images matter here: moving them changes the samples that have some, after their first image.
    moved = logits(model, input_ids, pixel_values + 1.0, attention_mask=attention_mask, position_ids=position_ids)
    assert torch.equal(moved[0], batched[0])
    assert not torch.allclose(moved[1:], batched[1:])


@pytest.mark.parametrize("immediate", [True, False])
def test_reading_mask_follows_text_time(immediate):
    """The mask the blocks get, against its definition: token t of sample b reads image m of b (its tokens, in the
    batch's padded layout) iff m is one of b's images and m == text time (immediate) or 1 <= m <= text time."""
    model = build(gates=1.0, only_attend_immediate_media=immediate)
    input_ids, attention_mask = pad(SAMPLES, "right")
    seen = []
    handle = model.model.gated_cross_attention["0"].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[2] if len(args) > 2 else kwargs["allowed"]), with_kwargs=True
    )
    try:
        logits(model, input_ids, images(sum(SAMPLE_IMAGES)), attention_mask=attention_mask)
    finally:
        handle.remove()
    tokens_per_image = model.config.num_media_tokens
    text_time = (input_ids == IMAGE_ID).long().cumsum(-1)[:, :, None]  # (B, T, 1)
    image = torch.arange(max(SAMPLE_IMAGES) * tokens_per_image) // tokens_per_image + 1  # (S,) image of each slot
    real = image[None, None, :] <= torch.tensor(SAMPLE_IMAGES)[:, None, None]  # (B, 1, S)
    expected = real & ((image == text_time) if immediate else (image <= text_time))
    assert len(seen) == 1 and torch.equal(seen[0], expected)


@pytest.fixture
def key_value_calls(monkeypatch) -> list[int]:
    """Counts calls of `GatedCrossAttentionBlock.media_key_values` (the images' keys / values)."""
    calls = [0]
    original = GatedCrossAttentionBlock.media_key_values

    def counting(self, media):
        calls[0] += 1
        return original(self, media)

    monkeypatch.setattr(GatedCrossAttentionBlock, "media_key_values", counting)
    return calls


def generate(model, calls, use_cache, **kwargs):
    calls[0] = 0
    new = kwargs.pop("max_new_tokens", 4)
    out = model.generate(
        max_new_tokens=new,
        min_new_tokens=new,  # no early stop: the number of forwards is known
        do_sample=False,
        use_cache=use_cache,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=PAD_ID,
        **kwargs,
    )
    return out, calls[0]


def test_greedy_generation_cache_equals_no_cache_and_images_encoded_once(key_value_calls):
    model = build(num_layers=4, every=2, gates=1.0, seed=2)
    num_blocks, steps = len(blocks(model)), 5
    assert num_blocks == 2
    prompt = dict(input_ids=torch.tensor([[BOS_ID, IMAGE_ID, 10, 11, IMAGE_ID, 12]]), pixel_values=images(2))
    cached, cached_calls = generate(model, key_value_calls, True, max_new_tokens=steps, **prompt)
    uncached, uncached_calls = generate(model, key_value_calls, False, max_new_tokens=steps, **prompt)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert cached_calls == num_blocks  # at prefill only; the decoding steps reuse them from the cache
    assert uncached_calls == num_blocks * steps
    # The images steer generation: other images, other scores.
    other, _ = generate(model, key_value_calls, True, max_new_tokens=steps, **{**prompt, "pixel_values": images(2, 9)})
    assert not torch.allclose(other.scores[0], cached.scores[0])


def test_forward_with_use_cache_then_decoding_steps_equals_the_full_forward():
    """A cache the language model makes itself (`use_cache=True`, no cache given) carries the images to the next
    forwards: token by token gives the full sequence's logits, and new images there are refused."""
    model = build(gates=1.0, seed=6)
    pixel_values = images(2)
    full = logits(model, TWO_IMAGES, pixel_values)
    with torch.no_grad():
        # Every image's marker is in the prompt (the images are encoded at its forward), the text goes on after.
        out = model(input_ids=TWO_IMAGES[:, :6], pixel_values=pixel_values, use_cache=True)
        steps = [out.logits]
        for position in range(6, TWO_IMAGES.shape[1]):
            out = model(
                input_ids=TWO_IMAGES[:, position : position + 1], use_cache=True, **{CACHE_KEY: out[CACHE_KEY]}
            )
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        with pytest.raises(
            ValueError, match="New images arrived while continuing a cached sequence.*without the cache"
        ):
            model(input_ids=torch.tensor([[IMAGE_ID]]), pixel_values=images(1), **{CACHE_KEY: out[CACHE_KEY]})


def test_beam_search_mixed_image_counts_cache_equals_no_cache(key_value_calls):
    model = build(num_layers=2, every=1, gates=1.0, seed=3)
    num_blocks, steps = len(blocks(model)), 3
    samples = [[BOS_ID, IMAGE_ID, 10, 11], [BOS_ID, IMAGE_ID, 12, IMAGE_ID, 13]]
    input_ids, attention_mask = pad(samples, "left")
    pixel_values = images(3, seed=4)  # sample 0: image 0; sample 1: images 1, 2
    # length_penalty=0: a beam's score is the sum of its tokens' log-probabilities.
    beams = dict(num_beams=2, num_return_sequences=2, max_new_tokens=steps, length_penalty=0.0)
    prompt = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **beams)
    cached, cached_calls = generate(model, key_value_calls, True, **prompt)
    uncached, uncached_calls = generate(model, key_value_calls, False, **prompt)
    assert cached.sequences.shape == (4, input_ids.shape[1] + steps)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=0)
    assert cached_calls == num_blocks
    assert uncached_calls == num_blocks * steps
    # Each beam read its own sample's images (beam search copies a sample with its images as a group): its score is
    # the log-likelihood of its tokens given that sample's text and images alone, in one forward. (Comparing with the
    # sample's own beam search would not tell, as that expands the images the same way.)
    for row, sequence in enumerate(cached.sequences):
        sample, sample_images = samples[row // 2], torch.split(pixel_values, [1, 2])[row // 2]
        full = torch.tensor([sample + sequence[-steps:].tolist()])
        log_probs = logits(model, full, sample_images).log_softmax(-1)[0, -steps - 1 : -1]  # (steps, vocab)
        likelihood = log_probs.gather(-1, full[0, -steps:, None]).sum()
        torch.testing.assert_close(cached.sequences_scores[row], likelihood, atol=2e-5, rtol=0, msg=f"row {row}")


# ---------------------------------------------------------------------------------------------------------------------
# 6: training
# ---------------------------------------------------------------------------------------------------------------------


def trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def caption_batch():
    """Two plain-coloured images, each followed by its own colour word (the loss is on that word and EOS)."""
    pixel_values = torch.zeros(4, 3, 16, 16)
    pixel_values[0::2, 0], pixel_values[1::2, 2] = 1.0, 1.0  # red, blue, red, blue
    pixel_values += 0.05 * images(4, seed=5)
    words = torch.tensor([20, 21, 20, 21])
    input_ids = torch.stack([torch.tensor([BOS_ID, IMAGE_ID, 30, w, EOS_ID]) for w in words.tolist()])
    labels = input_ids.clone()
    labels[:, :3] = -100
    return dict(input_ids=input_ids, pixel_values=pixel_values, labels=labels)


@pytest.mark.parametrize("stage", ["stage2", "align"])
def test_stage2_trains_bridge_and_blocks_only(stage):
    model = build(every=1)
    if stage == "align":
        with pytest.warns(FutureWarning, match="'stage2'"):
            model.freeze(stage)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.freeze(stage)
    expected = {
        n for n, _ in model.named_parameters() if n.startswith(("model.bridge.", "model.gated_cross_attention."))
    }
    assert trainable(model) == expected
    assert any(".attention_gate" in n for n in expected) and any(n.startswith("model.bridge.") for n in expected)
    model.train()
    batch = caption_batch()

    # At initialisation only the gates' gradients are non-zero (everything behind them is multiplied by tanh(0)).
    model(**batch).loss.backward()
    for block in blocks(model):
        assert block.attention_gate.grad.abs().item() > 0 and block.mlp_gate.grad.abs().item() > 0
    model.zero_grad(set_to_none=True)

    # With the gates open, every trainable parameter gets a gradient, and no frozen one does.
    set_gates(model, 0.5)
    model(**batch).loss.backward()
    for name, parameter in model.named_parameters():
        if name in expected:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, name
    assert all(parameter.grad.abs().sum() > 0 for name, parameter in model.named_parameters() if name in expected)


def test_stage2_steps_lower_the_caption_loss():
    model = build(every=1, seed=4)
    model.freeze("stage2")
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    batch = caption_batch()
    losses = []
    for _ in range(12):
        loss = model(**batch).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.25, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(block.attention_gate.item() != 0 for block in blocks(model))


@pytest.mark.parametrize("text", ["llama", "gpt2"])
def test_gradient_checkpointing_same_loss_and_gradients(text):
    model = build(text, every=1, gates=0.5)
    model.train()
    for module in model.modules():  # GPT-2 has dropout: off, so that both runs compute the same function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    batch = caption_batch()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference_loss, reference = loss_and_grads()
    model.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.language_model.is_gradient_checkpointing
    loss, checkpointed = loss_and_grads()
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=0)
    assert reference.keys() == checkpointed.keys()
    assert any(".gated_cross_attention." in name for name in reference)
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=0, msg=name)


def checkpointed_gradients(model, checkpointing: bool, *, then: str) -> dict[str, torch.Tensor]:
    """Gradients of one training forward after which, before backward, a second forward runs: `then="grad"` another
    training batch (the loss is the sum), `then="no_grad"` a reference forward without gradients (TRL's DPO, whose
    reference is the same model with adapters disabled, runs it between the policy forward and backward)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if checkpointing:
        model.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    batch = caption_batch()
    other = {**batch, "pixel_values": images(4, seed=11)}
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    if then == "grad":
        loss = loss + model(**other).loss
    else:
        with torch.no_grad():
            model(**other)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("then", ["grad", "no_grad"])
def test_gradient_checkpointing_with_a_second_forward_before_backward(then):
    reference = checkpointed_gradients(build(every=1, gates=0.5), False, then=then)
    checkpointed = checkpointed_gradients(build(every=1, gates=0.5), True, then=then)
    assert reference.keys() == checkpointed.keys()
    wrong = [n for n in reference if not torch.allclose(checkpointed[n], reference[n], atol=1e-6, rtol=0)]
    assert not wrong, f"{len(wrong)} of {len(reference)} gradients differ: {wrong[:4]}"


def test_language_model_alone_after_a_checkpointed_forward_is_the_plain_language_model():
    model = build(every=1, gates=1.0)
    model.train()
    lm, input_ids = model.model.language_model, caption_batch()["input_ids"]
    short = input_ids[:1, :3]  # another shape: the stale state must not be broadcast onto it either
    with torch.no_grad():
        plain, plain_short = lm(input_ids=input_ids).last_hidden_state, lm(input_ids=short).last_hidden_state
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(**caption_batch()).loss.backward()
    with torch.no_grad():
        assert torch.equal(lm(input_ids=input_ids).last_hidden_state, plain)
        assert torch.equal(lm(input_ids=short).last_hidden_state, plain_short)


# ---------------------------------------------------------------------------------------------------------------------
# 7-8: saving, loading, LoRA, copies
# ---------------------------------------------------------------------------------------------------------------------


def test_placement_every_n_layers():
    model = build(num_layers=4, every=2)
    assert model.config.cross_attention_layers() == [1, 3]
    assert sorted(model.model.gated_cross_attention.keys()) == ["1", "3"]
    layers = find_decoder_layers(model.model.language_model, 4)
    assert [bool(layer._forward_pre_hooks) for layer in layers] == [False, True, False, True]
    assert model.config.num_image_tokens == 1 and model.config.num_media_tokens == 3
    assert model.model.language_projection is None


def test_save_load_round_trip_keeps_the_gates(tmp_path):
    model = build(num_layers=4, every=2)
    with torch.no_grad():
        for value, block in zip((0.3, -0.7), blocks(model)):
            block.attention_gate.fill_(value)
            block.mlp_gate.fill_(-value)
    expected = logits(model, TWO_IMAGES, images(2))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert {"model.gated_cross_attention.1.attention_gate", "model.gated_cross_attention.3.mlp_gate"} <= set(saved)
    for loaded in (
        AutoModelForImageTextToText.from_pretrained(tmp_path),
        BridgeVLMForConditionalGeneration.from_pretrained(tmp_path),
    ):
        assert type(loaded) is BridgeVLMForConditionalGeneration and loaded.config.uses_cross_attention
        loaded.eval()
        assert [b.attention_gate.item() for b in blocks(loaded)] == [b.attention_gate.item() for b in blocks(model)]
        assert [b.mlp_gate.item() for b in blocks(loaded)] == [b.mlp_gate.item() for b in blocks(model)]
        state, loaded_state = model.state_dict(), loaded.state_dict()
        assert state.keys() == loaded_state.keys()
        assert all(torch.equal(state[key], loaded_state[key]) for key in state)
        assert torch.equal(logits(loaded, TWO_IMAGES, images(2)), expected)


def test_lora_adapters_disable_merge():
    peft = pytest.importorskip("peft")
    from vlbridge.trainers.lora import language_model_lora_config

    model = build(every=1, gates=0.5, seed=5)
    batch = caption_batch()
    original = logits(model, batch["input_ids"], batch["pixel_values"])
    original_gates = [b.attention_gate.detach().clone() for b in blocks(model)]
    config = language_model_lora_config(model, r=4)
    assert {"model.gated_cross_attention.0", "model.gated_cross_attention.1"} <= set(config.modules_to_save)
    peft_model = peft.get_peft_model(model, config)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        peft_model(**batch).loss.backward()
        optimizer.step()
    peft_model.eval()
    adapted = logits(peft_model, batch["input_ids"], batch["pixel_values"])
    assert not torch.allclose(adapted, original)
    with peft_model.disable_adapter():
        disabled = logits(peft_model, batch["input_ids"], batch["pixel_values"])
    torch.testing.assert_close(disabled, original, atol=1e-6, rtol=0)
    merged = peft_model.merge_and_unload()
    assert type(merged) is BridgeVLMForConditionalGeneration
    torch.testing.assert_close(logits(merged, batch["input_ids"], batch["pixel_values"]), adapted, atol=1e-5, rtol=0)
    # The trained copies of the blocks are what the merged model runs.
    assert all(not torch.equal(b.attention_gate, g) for b, g in zip(blocks(merged), original_gates))


def test_deep_copy_runs_its_own_blocks():
    model = build(every=1, gates=0.5)
    pixel_values = images(2)
    before = logits(model, TWO_IMAGES, pixel_values)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone, TWO_IMAGES, pixel_values), before, atol=0, rtol=0)
    set_gates(clone, -1.0)
    assert torch.equal(logits(model, TWO_IMAGES, pixel_values), before)
    assert not torch.allclose(logits(clone, TWO_IMAGES, pixel_values)[:, BETWEEN], before[:, BETWEEN])
    set_gates(model, 0.0)
    assert not torch.allclose(logits(clone, TWO_IMAGES, pixel_values)[:, BETWEEN], before[:, BETWEEN])


# ---------------------------------------------------------------------------------------------------------------------
# 9: bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_markers_and_images_must_match_in_number():
    model = build()
    fix = r"markers and images differ in number.*2 <image> markers.*but {} images were given.*one <image> per image"
    with pytest.raises(ValueError, match=fix.format(1)):
        model(input_ids=TWO_IMAGES, pixel_values=images(1))  # more markers
    with pytest.raises(ValueError, match=fix.format(3)):
        model(input_ids=TWO_IMAGES, pixel_values=images(3))  # more images
    with pytest.raises(ValueError, match=r"markers and images differ in number.*Give one image per <image>"):
        model(input_ids=TWO_IMAGES)  # markers, no images


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_layers=2, every=4), r"cross_attention_every_n_layers=4 must divide.*use one of \[1, 2\]"),
        (dict(num_layers=4, every=3), r"cross_attention_every_n_layers=3 must divide.*use one of \[1, 2, 4\]"),
        (dict(image_fusion="bogus"), r"image_fusion='bogus' is not one of \('tokens', 'gated_cross_attention'\)"),
        (dict(image_grid_pinpoints=[[16, 32]]), r"image_grid_pinpoints.*set image_grid_pinpoints=None"),
    ],
)
def test_bad_configs_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gated_config(**kwargs)


def test_encoder_decoder_language_model_refused():
    t5 = dict(model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=PAD_ID)
    with pytest.raises(ValueError, match=r"'t5' is an encoder-decoder: use image_fusion='tokens'"):
        BridgeVLMConfig(
            vision_config=VISION_CONFIG,
            bridge_config=PERCEIVER_CONFIG,
            text_config={**t5, **COMMON_TEXT},
            image_token_id=IMAGE_ID,
            image_fusion="gated_cross_attention",
            cross_attention_every_n_layers=1,
        )


class _Toy(nn.Module):
    def __init__(self, *lists: int):
        super().__init__()
        for index, length in enumerate(lists):
            setattr(self, f"stack{index}", nn.ModuleList(nn.Linear(2, 2) for _ in range(length)))


def test_find_decoder_layers():
    toy = _Toy(3)  # not a known path, but the only list of the right length
    assert find_decoder_layers(toy, 3) is toy.stack0
    with pytest.raises(
        ValueError,
        match=r"Cannot find the decoder layers of language model _Toy.*found: none.*"
        r"DECODER_LAYER_PATHS, or use image_fusion='tokens'",
    ):
        find_decoder_layers(_Toy(2), 3)
    with pytest.raises(ValueError, match=r"found: stack0, stack1"):
        find_decoder_layers(_Toy(3, 3), 3)
    with pytest.raises(ValueError, match="Cannot find the decoder layers"):
        find_decoder_layers(nn.Linear(2, 2), 2)


def test_reentrant_checkpointing_is_refused_where_it_would_drop_the_images():
    """transformers < 5.24 checkpoints a decoder layer's whole call, hooks included: reentrant checkpointing runs it
    again on detached inputs without the images, so the blocks would get no gradient. Refused there; later releases
    checkpoint `forward` only, the hooks stay outside, and reentrant checkpointing gives the plain gradients."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = build(every=1, gates=0.5)
    model.freeze("stage2")
    model.train()
    batch = caption_batch()
    plain_loss = model(**batch).loss
    plain_loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if "__call__" in vars(GradientCheckpointingLayer):
        with pytest.raises(ValueError, match="use_reentrant': False"):
            model(**batch).loss.backward()
        return
    model(**batch).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=0)
