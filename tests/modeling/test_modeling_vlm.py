"""The composite VLM across every bridge x vision tower x language-model family."""

import itertools
import logging
import re

import pytest
import torch
from tiny import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, vlm_config
from transformers import AutoModelForImageTextToText

from vlbridge import BridgeVLMConfig, BridgeVLMForConditionalGeneration
from vlbridge.modeling.freezing import FREEZE_STAGES


COMBOS = list(itertools.product(["clip", "siglip"], ["qformer", "perceiver", "mlp"], ["opt", "llama", "t5"]))


def build(vision="clip", bridge="qformer", text="opt", seed=0, **kwargs):
    torch.manual_seed(seed)
    return BridgeVLMForConditionalGeneration(vlm_config(vision, bridge, text, **kwargs))


def batch(config: BridgeVLMConfig, batch_size: int = 2, text_len: int = 5, seed: int = 0):
    """Decoder-only style inputs: BOS, one image's placeholder run, a few text tokens."""
    g = torch.Generator().manual_seed(seed)
    n = config.num_image_tokens
    text = torch.randint(10, 60, (batch_size, text_len), generator=g)
    image = torch.full((batch_size, n), IMAGE_ID)
    input_ids = torch.cat([torch.full((batch_size, 1), BOS_ID), image, text], dim=1)
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=g)
    labels = input_ids.clone()
    labels[:, : 1 + n] = -100  # image and BOS positions never give loss
    return input_ids, pixel_values, labels


def seq2seq_batch(config, batch_size=2, seed=0):
    input_ids, pixel_values, _ = batch(config, batch_size, seed=seed)
    labels = torch.randint(10, 60, (batch_size, 4), generator=torch.Generator().manual_seed(seed + 1))
    return input_ids, pixel_values, labels


@pytest.mark.parametrize("vision,bridge,text", COMBOS)
def test_forward_loss_gradients_generate(vision, bridge, text):
    model = build(vision, bridge, text)
    config = model.config
    is_t5 = text == "t5"
    input_ids, pixel_values, labels = (seq2seq_batch if is_t5 else batch)(config)
    out = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
    # Logits align one-to-one with input_ids (decoder-only) or with the targets (encoder-decoder).
    assert out.logits.shape == (*labels.shape, config.text_config.vocab_size)
    assert out.image_hidden_states.shape[:2] == (2, config.num_image_tokens)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # The Q-Former's text branch (embeddings, text feed-forward) is idle without instruction text.
    text_branch = re.compile(r"(word_embeddings|position_embeddings|layer\.\d+\.(intermediate|output)\.)")
    bridge_grads = [p.grad for n, p in model.model.bridge.named_parameters() if not text_branch.search(n)]
    assert bridge_grads and all(g is not None for g in bridge_grads)
    assert any(g.abs().sum() > 0 for g in bridge_grads)
    assert model.model.language_projection.weight.grad.abs().sum() > 0

    model.eval()
    generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False)
    if is_t5:
        assert generated.shape[0] == 2 and generated.shape[1] <= 4  # decoder start + at most 3 new tokens
    else:
        assert generated.shape == (2, input_ids.shape[1] + 3)  # max_new_tokens counts only new tokens
        assert torch.equal(generated[:, : input_ids.shape[1]], input_ids)


@pytest.mark.parametrize(
    "vision,bridge,text", [c for c in COMBOS if c[0] == "clip"] + [("siglip", "qformer", "llama")]
)
def test_save_load_round_trip_bit_exact(tmp_path, vision, bridge, text):
    model = build(vision, bridge, text).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is BridgeVLMForConditionalGeneration
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    input_ids, pixel_values, labels = (seq2seq_batch if text == "t5" else batch)(model.config)
    with torch.no_grad():
        a = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).logits
        b = loaded(input_ids=input_ids, pixel_values=pixel_values, labels=labels).logits
    assert torch.equal(a, b)


def test_lm_head_tied_per_family():
    for text in ("opt", "llama", "t5"):
        model = build(text=text)
        tied = model.config.tie_word_embeddings
        assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied, text


def test_placeholder_count_checked():
    model = build()
    input_ids, pixel_values, labels = batch(model.config)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=input_ids[:, :-6], pixel_values=pixel_values)  # one image run cut short
    with pytest.raises(ValueError, match="do not match"):
        model(input_ids=input_ids, pixel_values=pixel_values[:1])  # two runs, one image
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=input_ids)


def test_images_enter_only_at_placeholders():
    """Changing the image changes the logits, and text-only rows ignore it."""
    model = build(text="llama").eval()
    input_ids, pixel_values, _ = batch(model.config)
    with torch.no_grad():
        a = model(input_ids=input_ids, pixel_values=pixel_values).logits
        b = model(input_ids=input_ids, pixel_values=pixel_values + 1.0).logits
        text_only = model(input_ids=input_ids[:, -3:]).logits
    assert not torch.allclose(a, b)
    assert text_only.shape == (2, 3, model.config.text_config.vocab_size)


def test_vision_feature_layer_selects_hidden_state():
    model = build(bridge="mlp", text="llama", vision_feature_layer=-2).eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values)
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
        expected = model.model.language_projection(model.model.bridge(hidden).image_tokens)
    torch.testing.assert_close(feats, expected)


def test_batched_generation_left_padding_matches_single():
    model = build(text="llama", seed=1).eval()
    n = model.config.num_image_tokens
    long_ids = torch.tensor([[BOS_ID] + [IMAGE_ID] * n + [11, 12, 13, 14]])
    short_ids = torch.tensor([[BOS_ID] + [IMAGE_ID] * n + [15, 16]])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.cat([torch.full((1, 2), PAD_ID), short_ids], 1), long_ids])
    mask = (torch.arange(padded.shape[1]) >= torch.tensor([[2], [0]])).long()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    batched = model.generate(input_ids=padded, attention_mask=mask, pixel_values=pixels, **kwargs)
    single_short = model.generate(input_ids=short_ids, pixel_values=pixels[:1], **kwargs)
    single_long = model.generate(input_ids=long_ids, pixel_values=pixels[1:], **kwargs)
    assert torch.equal(batched[0, 2:], single_short[0])
    assert torch.equal(batched[1], single_long[0])


@pytest.mark.parametrize("text", ["llama", "t5"])
def test_generate_never_emits_the_image_placeholder(text):
    """A model that prefers the `<image>` token still generates (it is suppressed) instead of asking for images."""
    model = build(text=text, seed=1).eval()
    with torch.no_grad():
        model.get_output_embeddings().bias = torch.nn.Parameter(torch.zeros(model.config.text_config.vocab_size))
        model.get_output_embeddings().bias[IMAGE_ID] = 1e4
    ids = torch.tensor([[BOS_ID] + [IMAGE_ID] * model.config.num_image_tokens + [11]])
    out = model.generate(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=3, do_sample=False)
    new = out[0, ids.shape[1] :] if text == "llama" else out[0, 1:]
    assert len(new) == 3 and IMAGE_ID not in new.tolist()


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_generate_modes_and_kv_cache(text):
    model = build(text=text, seed=2).eval()
    input_ids, pixel_values, _ = batch(model.config)
    greedy = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=4, do_sample=False)
    no_cache = model.generate(
        input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=4, do_sample=False, use_cache=False
    )
    assert torch.equal(greedy, no_cache)  # the KV cache changes speed, never the tokens
    beams = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=4, num_beams=3)
    assert beams.shape[0] == 2
    torch.manual_seed(0)
    sampled = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape[0] == 2


def test_freeze_stages_and_logging(caplog):
    model = build(text="llama")
    with caplog.at_level(logging.INFO, logger="vlbridge"):
        counts = model.freeze("stage2")
    assert counts["vision_tower"] == 0 and counts["language_model"] == 0 and counts["lm_head"] == 0
    assert counts["bridge"] > 0 and counts["language_projection"] > 0
    assert "bridge: trains" in caplog.text and "vision_tower: frozen" in caplog.text
    model.train()
    assert not model.model.vision_tower.training and model.model.bridge.training

    counts = model.freeze("finetune")
    assert counts["vision_tower"] == 0 and counts["language_model"] > 0 and counts["lm_head"] > 0
    counts = model.freeze("full-finetune")
    assert all(v > 0 for v in counts.values())
    model.train()
    assert model.model.vision_tower.training
    assert set(model.freeze("frozen").values()) == {0}
    with pytest.raises(ValueError, match="choose one of"):
        model.freeze("stage-9")
    assert set(FREEZE_STAGES) >= {"stage2", "finetune", "full-finetune", "frozen"}


def test_align_stage_training_only_moves_bridge():
    model = build(text="opt")
    model.freeze("stage2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids, pixel_values, labels = batch(model.config)
    model.train()
    model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        if ".bridge." in name or "language_projection" in name:
            continue
        assert not changed, f"{name} is frozen in 'align' but changed"
    assert not torch.equal(before["model.language_projection.weight"], model.model.language_projection.weight)


def test_bridge_stays_fp32_when_loaded_in_bf16(tmp_path):
    model = build(text="llama")
    model.save_pretrained(tmp_path)
    loaded = BridgeVLMForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in loaded.model.bridge.parameters())
    assert loaded.model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert loaded.model.vision_tower.dtype == torch.bfloat16
    input_ids, pixel_values, labels = batch(loaded.config)
    out = loaded(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in loaded.model.bridge.parameters() if p.grad is not None)


def test_gradient_checkpointing_same_gradients():
    config = vlm_config(text="llama")
    config.bridge_config.attention_probs_dropout_prob = 0.0  # functional dropout, not an nn.Dropout module
    torch.manual_seed(0)
    model = BridgeVLMForConditionalGeneration(config)
    model.train()
    for module in model.modules():  # dropout off, so both runs compute the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    input_ids, pixel_values, labels = batch(model.config)

    def grads():
        model.zero_grad()
        model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(reference[name], checkpointed[name], atol=1e-5, rtol=1e-4, msg=name)


def test_images_without_image_token_id_raise_naming_it():
    config = vlm_config()
    config.image_token_id = None  # buildable (transformers builds `BridgeVLMConfig()` itself), but cannot take images
    model = BridgeVLMForConditionalGeneration(config).eval()
    input_ids, pixel_values, _ = batch(model.config)
    with pytest.raises(ValueError, match=r"config\.image_token_id is None"):
        model(input_ids=input_ids, pixel_values=pixel_values)
    text = torch.tensor([[BOS_ID, 12, 13]])
    assert model(input_ids=text).logits.shape == (1, 3, config.text_config.vocab_size)


TEXT_BRANCH = re.compile(r"embeddings\.(word|position)_embeddings\.|layer\.\d+\.(intermediate|output)\.")


def test_readme_style_qformer_bridge_has_no_text_branch():
    from vlbridge import QFormerConfig, QFormerModel

    # As in the README: a plain QFormerConfig, whose use_text_input defaults to True.
    qformer = QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = BridgeVLMConfig(
        vision_config=vlm_config().vision_config,
        bridge_config=qformer,
        text_config=vlm_config().text_config,
        image_token_id=IMAGE_ID,
    )
    model = BridgeVLMForConditionalGeneration(config)
    bridge_keys = list(model.model.bridge.state_dict())
    assert bridge_keys and not [key for key in bridge_keys if TEXT_BRANCH.search(key)]

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with_text = count(QFormerModel(QFormerConfig(**{**qformer.to_dict(), "use_text_input": True})))
    without_text = count(QFormerModel(QFormerConfig(**{**qformer.to_dict(), "use_text_input": False})))
    assert count(model.model.bridge) == without_text < with_text
    # InstructBLIP mode keeps the text branch, which then reads the instruction.
    instruct = BridgeVLMForConditionalGeneration(
        BridgeVLMConfig.from_dict({**config.to_dict(), "use_qformer_text_input": True})
    )
    assert count(instruct.model.bridge) == with_text


def test_old_checkpoint_with_an_unused_text_branch_loads_without_it(tmp_path, caplog):
    import json

    old = build(use_qformer_text_input=True).eval()  # stands for a checkpoint saved with the text branch
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["use_qformer_text_input"] = False  # ... by a VLM that never fed it text
    assert saved["bridge_config"].get("use_text_input", True)
    (tmp_path / "config.json").write_text(json.dumps(saved))

    with caplog.at_level(logging.WARNING):
        loaded = BridgeVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not loaded.config.bridge_config.use_text_input
    assert not [key for key in loaded.state_dict() if TEXT_BRANCH.search(key.removeprefix("model.bridge."))]
    assert "unexpected" not in caplog.text.lower()
    old_state = old.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, old_state[key]), key
    input_ids, pixel_values, _ = batch(loaded.config)
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=input_ids, pixel_values=pixel_values).logits).all()
