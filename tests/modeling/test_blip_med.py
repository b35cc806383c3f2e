"""Tests of BLIP's MED pretraining model (`BlipMEDForImageTextPretraining`): its losses from the shared stage-1
objectives, the encoder-decoder sharing through save / load, the captioner and matcher alone, exact gradient
accumulation, captioning through `generate`, and a short learning run on the built-in shapes."""

import json

import pytest
import torch
from helpers import run_docstring_examples
from tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from torch.nn import functional as F
from transformers import AutoModel, AutoModelForPreTraining, CLIPImageProcessor

from vlbridge import BlipMEDConfig, BlipMEDForImageTextPretraining, QFormerForImageTextPretraining
from vlbridge.data import build_word_tokenizer, caption_vocabulary, group_captions, make_synthetic_image_text
from vlbridge.evaluation import evaluate_stage1
from vlbridge.modeling import stage1_losses as losses
from vlbridge.trainers import ImageTextCollator, Stage1Config, Stage1Trainer


DEC_ID, ENC_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1  # BLIP's [DEC] and [ENC]; unused by the tiny tokenizer
VISION_WIDTH = 48  # != the text width (32): the cross-attention reads the vision width
BATCH = 4

pytestmark = pytest.mark.usefixtures("single_thread")


def make_config(text: dict | None = None, **overrides) -> BlipMEDConfig:
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 32,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "pad_token_id": PAD_ID,
        "bos_token_id": DEC_ID,
        "eos_token_id": EOS_ID,
        "sep_token_id": EOS_ID,
        **(text or {}),
    }
    vision = {
        "model_type": "blip_vision_model",
        "hidden_size": VISION_WIDTH,
        "intermediate_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,  # BlipVisionConfig's default (1e-10) is for loading weights: a dead tower
    }
    options = {
        "embed_dim": 16,
        "decoder_start_token_id": DEC_ID,
        "enc_token_id": ENC_ID,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "use_momentum_distillation": False,
        "queue_size": 8,
        **overrides,
    }
    return BlipMEDConfig(vision_config=vision, text_config=text, **options)


def make_model(seed: int = 0, **overrides) -> BlipMEDForImageTextPretraining:
    torch.manual_seed(seed)
    model = BlipMEDForImageTextPretraining(make_config(**overrides))
    with torch.no_grad():  # LayerNorms start at 1 / 0 and heads near 0: perturb so that every parameter matters
        for name, param in model.named_parameters():
            if not name.startswith("temp") and not name.split(".")[0].endswith("_m"):
                param.add_(0.1 * torch.randn_like(param))
    if model.uses_momentum_distillation:
        model.copy_params()
    return model


def make_batch(batch_size: int = BATCH, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    lengths = [6, 4, 5, 3, 6, 2, 5, 4][:batch_size] + [5] * max(0, batch_size - 8)
    input_ids = torch.full((batch_size, 6), PAD_ID)
    for row, length in enumerate(lengths):
        input_ids[row, 0] = BOS_ID
        input_ids[row, 1 : length - 1] = torch.randint(5, 60, (length - 2,), generator=generator)
        input_ids[row, length - 1] = EOS_ID
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=generator)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": (input_ids != PAD_ID).long()}


def shared_pairs(model) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(name, decoder parameter, encoder parameter) for every parameter BLIP shares."""
    encoder = dict(model.text_encoder.named_parameters())
    decoder = dict(model.text_decoder.bert.named_parameters(remove_duplicate=False))
    return [(name, decoder[name], encoder[name]) for name in encoder if ".attention." not in name]


# ---------------------------------------------------------------------------------------------------------------------
# Outputs and the shared objectives
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [False, True])
def test_outputs_have_every_loss_with_the_right_shapes(momentum):
    model = make_model(use_momentum_distillation=momentum, itm_weight=0.5, itg_weight=2.0).train()
    batch = make_batch()
    out = model(**batch, sampling_seed=0)
    assert out.logits_per_image.shape == out.logits_per_text.shape == (BATCH, BATCH)
    assert out.itm_logits.shape == (3 * BATCH, 2) and out.itm_labels.tolist() == [1] * BATCH + [0] * 2 * BATCH
    assert out.itg_logits.shape == (BATCH, batch["input_ids"].shape[1], VOCAB_SIZE)
    assert out.image_embeds.shape == (BATCH, 1, 16) and out.text_embeds.shape == (BATCH, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(BATCH, 1))
    for name in ("loss", "loss_itc", "loss_itm", "loss_itg"):
        assert out[name].ndim == 0 and torch.isfinite(out[name]), name
    torch.testing.assert_close(out.loss, out.loss_itc + 0.5 * out.loss_itm + 2.0 * out.loss_itg)
    out.loss.backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable and not [name for name in missing if not name.startswith("vision_tower.post_layernorm")], missing
    assert hasattr(model, "text_encoder_m") == momentum and hasattr(model, "vision_tower_m") == momentum
    if momentum:
        assert model.image_queue.shape == (8, 1, 16) and int(model.queue_ptr) == BATCH
        assert not any(p.requires_grad for n, p in model.named_parameters() if n.split(".")[0].endswith("_m"))
        torch.testing.assert_close(model.image_queue[:BATCH], out.image_embeds.detach())  # copies == model at step 0


def test_itc_itm_and_lm_equal_a_direct_computation():
    """The shared module's numbers against BLIP's definitions, computed here from the towers and heads directly."""
    model = make_model(itc_label_smoothing=0.1).eval()
    batch = make_batch()
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    out = model(**batch, sampling_seed=7)
    with torch.no_grad():
        vision = model.vision_tower(pixel_values=pixels).last_hidden_state  # (B, P, Dv)
        image = F.normalize(model.vision_proj(vision[:, 0]), dim=-1)
        text = F.normalize(
            model.text_proj(model.text_encoder(ids, attention_mask=mask).last_hidden_state[:, 0]), dim=-1
        )
        sim = image @ text.t() / model.temp
        targets = 0.9 * torch.eye(BATCH) + 0.1 / BATCH
        itc = (-(targets * sim.log_softmax(1)).sum(1).mean() - (targets * sim.t().log_softmax(1)).sum(1).mean()) / 2
        torch.testing.assert_close(out.logits_per_image, sim)
        torch.testing.assert_close(out.loss_itc, itc)

        # ITM: [ENC] first, cross-attention to every patch, itm_head on the first position; the negatives are the
        # shared sampler's draws from the ITC similarities with the step's seed.
        generator = torch.Generator().manual_seed(7)
        positives = torch.eye(BATCH, dtype=torch.bool)
        negative_images = losses.sample_hard_negatives(sim.t(), positives, generator)
        negative_texts = losses.sample_hard_negatives(sim, positives, generator)

        def itm(images, texts, masks):
            enc_ids = texts.clone()
            enc_ids[:, 0] = ENC_ID
            hidden = model.text_encoder(enc_ids, attention_mask=masks, encoder_hidden_states=images).last_hidden_state
            return model.itm_head(hidden[:, 0])

        expected = torch.cat(
            [
                itm(vision, ids, mask),
                itm(vision[negative_images], ids, mask),
                itm(vision, ids[negative_texts], mask[negative_texts]),
            ]
        )
        torch.testing.assert_close(out.itm_logits, expected)
        torch.testing.assert_close(out.loss_itm, F.cross_entropy(expected, out.itm_labels))

        # LM: [DEC] first, -100 on padding, smoothed by config.label_smoothing: transformers' own decoder loss.
        decoder_ids = ids.clone()
        decoder_ids[:, 0] = DEC_ID
        model.text_decoder.label_smoothing = model.config.label_smoothing
        reference = model.text_decoder(
            decoder_ids, attention_mask=mask, encoder_hidden_states=vision, labels=ids.masked_fill(mask == 0, -100)
        )
        torch.testing.assert_close(out.loss_itg, reference.loss)
        torch.testing.assert_close(out.itg_logits, reference.logits)


def test_enc_token_none_keeps_the_first_token():
    model = make_model().eval()
    batch = make_batch()
    vision = model.get_vision_features(batch["pixel_values"])
    with torch.no_grad():
        with_enc = model.compute_itm_logits(vision, batch["input_ids"], batch["attention_mask"])
        model.config.enc_token_id = None
        as_given = model.compute_itm_logits(vision, batch["input_ids"], batch["attention_mask"])
        ids = batch["input_ids"].clone()
        ids[:, 0] = ENC_ID
        replaced = model.compute_itm_logits(vision, ids, batch["attention_mask"])
    assert not torch.allclose(with_enc, as_given)
    torch.testing.assert_close(with_enc, replaced)


def test_momentum_copies_follow_the_ema_and_the_queue_wraps():
    model = make_model(use_momentum_distillation=True, momentum=0.9, queue_size=8, itm_weight=0, itg_weight=0).train()
    names = {name for name, _ in model.named_parameters() if name.split(".")[0].endswith("_m")}
    assert {name.split(".")[0] for name in names} == {
        "text_encoder_m",
        "vision_proj_m",
        "text_proj_m",
        "vision_tower_m",
    }
    with torch.no_grad():
        for param in model.text_encoder.parameters():
            param.add_(0.05 * torch.randn_like(param))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pointers = []
    for step in range(3):
        model(**make_batch(seed=step))
        pointers.append(int(model.queue_ptr))
        if step == 0:
            for name in names:
                head, rest = name.split(".", 1)
                expected = before[name] * 0.9 + before[f"{head[:-2]}.{rest}"] * 0.1
                torch.testing.assert_close(dict(model.named_parameters())[name], expected, msg=name)
    assert pointers == [4, 0, 4] and int(model.momentum_step) == 3
    frozen = make_model(use_momentum_distillation=True, freeze_vision_tower=True)
    assert not hasattr(frozen, "vision_tower_m") and not any(p.requires_grad for p in frozen.vision_tower.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Encoder-decoder sharing, save / load
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_decoder_shares_all_but_self_attention_through_save_and_load(tmp_path, tie_word_embeddings):
    model = make_model(use_momentum_distillation=True, tie_word_embeddings=tie_word_embeddings)
    pairs = shared_pairs(model)
    assert {name.split(".")[0] for name, _, _ in pairs} == {"embeddings", "encoder"}
    assert any("crossattention" in name for name, _, _ in pairs) and any(".output." in name for name, _, _ in pairs)
    assert all(decoder is encoder for _, decoder, encoder in pairs)
    for layer, enc_layer in zip(model.text_decoder.bert.encoder.layer, model.text_encoder.encoder.layer):
        assert all(p is not q for p, q in zip(layer.attention.parameters(), enc_layer.attention.parameters()))
    head = model.text_decoder.cls.predictions.decoder.weight
    assert (head is model.text_encoder.embeddings.word_embeddings.weight) == tie_word_embeddings

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["BlipMEDForImageTextPretraining"] and saved["share_encoder_decoder"] is True
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "model.safetensors"))
    assert not any(f"text_decoder.bert.{name}" in keys for name, _, _ in pairs)  # each shared tensor saved once
    assert ("text_decoder.cls.predictions.decoder.weight" in keys) != tie_word_embeddings

    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, BlipMEDForImageTextPretraining) and not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert all(decoder is encoder for _, decoder, encoder in shared_pairs(loaded))
    loaded_head = loaded.text_decoder.cls.predictions.decoder.weight
    assert (loaded_head is loaded.text_encoder.embeddings.word_embeddings.weight) == tie_word_embeddings
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name

    # One tensor: a gradient step through the LM loss alone moves the encoder's view with the decoder's.
    batch = make_batch()
    optimizer = torch.optim.SGD(loaded.parameters(), lr=1.0)
    before = {name: decoder.detach().clone() for name, decoder, _ in shared_pairs(loaded)}
    image_embeds = loaded.get_vision_features(batch["pixel_values"])
    loaded._itg(image_embeds, batch["input_ids"], batch["attention_mask"])[0].backward()
    optimizer.step()
    moved = [name for name, decoder, encoder in shared_pairs(loaded) if not torch.equal(decoder, before[name])]
    assert "encoder.layer.0.crossattention.self.key.weight" in moved and "embeddings.LayerNorm.weight" in moved
    assert all(torch.equal(decoder, encoder) for _, decoder, encoder in shared_pairs(loaded))


def test_unshared_decoder_has_its_own_weights(tmp_path):
    model = make_model(share_encoder_decoder=False)
    assert all(decoder is not encoder for _, decoder, encoder in shared_pairs(model))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert all(decoder is not encoder for _, decoder, encoder in shared_pairs(loaded))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_round_trip_through_the_auto_classes_gives_the_same_outputs(tmp_path):
    model = make_model(use_momentum_distillation=True).train()
    model(**make_batch(seed=3))  # fill a queue slot and move the momentum copies off the model
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BlipMEDForImageTextPretraining)
    batch = make_batch()
    with torch.no_grad():
        a, b = model(**batch, sampling_seed=0), loaded(**batch, sampling_seed=0)
    for name in ("loss", "loss_itc", "loss_itm", "loss_itg", "logits_per_image", "itm_logits", "itg_logits"):
        torch.testing.assert_close(a[name], b[name], msg=name)
    assert torch.equal(model.image_queue, loaded.image_queue) and int(loaded.queue_ptr) == int(model.queue_ptr)
    torch.testing.assert_close(
        model.generate_captions(batch["pixel_values"], max_new_tokens=6),
        loaded.generate_captions(batch["pixel_values"], max_new_tokens=6),
    )


def test_loading_without_momentum_weights_copies_the_model(tmp_path):
    make_model(use_momentum_distillation=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["use_momentum_distillation"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = BlipMEDForImageTextPretraining.from_pretrained(tmp_path)
    for module, module_m in loaded._momentum_pairs():
        assert all(torch.equal(p, q) for p, q in zip(module.parameters(), module_m.parameters()))


def test_resizing_the_vocabulary_keeps_the_sharing():
    model = make_model(use_momentum_distillation=True)
    model.resize_token_embeddings(VOCAB_SIZE + 4)
    assert model.config.text_config.vocab_size == VOCAB_SIZE + 4
    assert all(decoder is encoder for _, decoder, encoder in shared_pairs(model))
    assert model.text_decoder.cls.predictions.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    assert model.text_encoder_m.get_input_embeddings().weight.shape[0] == VOCAB_SIZE + 4
    out = model(**make_batch())
    assert out.itg_logits.shape[-1] == VOCAB_SIZE + 4 and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------------------------
# A captioner alone, a matcher alone
# ---------------------------------------------------------------------------------------------------------------------


def test_captioner_alone_builds_only_its_parts_and_refuses_itc_itm():
    with pytest.raises(Exception, match="ITC and ITM need the text encoder"):
        make_config(with_text_encoder=False, share_encoder_decoder=False)
    model = make_model(
        with_text_encoder=False,
        share_encoder_decoder=False,
        itc_weight=0,
        itm_weight=0,
        use_momentum_distillation=True,
    )
    for name in ("text_encoder", "vision_proj", "text_proj", "itm_head", "text_encoder_m", "image_queue"):
        assert not hasattr(model, name), name
    assert model.supports_captioning and not model.supports_matching and not model.uses_momentum_distillation
    batch = make_batch()
    out = model(**batch)
    assert out.loss_itc is None and out.loss_itm is None and out.logits_per_image is None
    torch.testing.assert_close(out.loss, out.loss_itg)
    with pytest.raises(ValueError, match="no text encoder"):
        model(**batch, return_loss=False)
    with pytest.raises(ValueError, match="with_text_encoder=False"):
        model.compute_itm_logits(model.get_vision_features(batch["pixel_values"]), batch["input_ids"])
    with pytest.raises(ValueError, match="with_text_encoder=False"):
        model.get_text_features(batch["input_ids"])
    model.config.itm_weight = 1.0  # a config changed after building: refused before any work, naming the fix
    with pytest.raises(ValueError, match="set itc_weight=0 and itm_weight=0"):
        model(**batch)
    assert model.generate_captions(batch["pixel_values"], max_new_tokens=3).shape[0] == BATCH


def test_matcher_alone_builds_only_its_parts_and_refuses_captions():
    with pytest.raises(Exception, match="LM loss needs the text decoder"):
        make_config(with_text_decoder=False, share_encoder_decoder=False)
    with pytest.raises(Exception, match="share_encoder_decoder=True needs both"):
        make_config(with_text_decoder=False, itg_weight=0)
    model = make_model(with_text_decoder=False, share_encoder_decoder=False, itg_weight=0)
    assert not hasattr(model, "text_decoder") and model.get_output_embeddings() is None
    assert model.supports_matching and not model.supports_captioning
    batch = make_batch()
    out = model(**batch, sampling_seed=0)
    assert out.loss_itg is None and out.itg_logits is None
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm)
    with pytest.raises(ValueError, match="with_text_decoder=True"):
        model.generate_captions(batch["pixel_values"])
    model.config.itg_weight = 1.0
    with pytest.raises(ValueError, match="with_text_decoder=False"):
        model(**batch)


def test_config_keeps_the_text_towers_cross_attention_and_one_tie_flag():
    with pytest.raises(Exception, match="is_decoder must be True"):
        make_config(text={"is_decoder": False})
    assert make_config(tie_word_embeddings=False).text_config.tie_word_embeddings is False


# ---------------------------------------------------------------------------------------------------------------------
# Exact gradient accumulation with the stage-1 trainer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    splits = make_synthetic_image_text({"train": 16, "test": 6}, image_size=32, captions_per_image=2)
    tokenizer = build_word_tokenizer([*caption_vocabulary(), "[DEC]", "[ENC]"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return splits, tokenizer, ImageTextCollator(image_processor, tokenizer, max_length=24)


def tokenizer_model(tokenizer, seed: int = 0, **overrides) -> BlipMEDForImageTextPretraining:
    dec, enc = tokenizer.convert_tokens_to_ids("[DEC]"), tokenizer.convert_tokens_to_ids("[ENC]")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    text = {
        "vocab_size": len(tokenizer),
        "bos_token_id": dec,
        "pad_token_id": pad,
        "eos_token_id": eos,
        "sep_token_id": eos,
    }
    text.update(overrides.pop("text", {}))
    torch.manual_seed(seed)
    config = make_config(
        text, decoder_start_token_id=dec, enc_token_id=enc, pad_token_id=pad, eos_token_id=eos, **overrides
    )
    return BlipMEDForImageTextPretraining(config)


def train_steps(tmp_path, data, batch_size, accumulation, steps=1, **overrides):
    splits, tokenizer, collator = data
    model = tokenizer_model(tokenizer, **overrides)
    args = Stage1Config(
        str(tmp_path),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_drop_last=True,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Stage1Trainer(model=model, args=args, train_dataset=splits["train"], data_collator=collator)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(splits["train"])
    trainer.train()
    return model, trainer


@pytest.mark.parametrize(
    "parts",
    [
        {},
        {"with_text_encoder": False, "share_encoder_decoder": False, "itc_weight": 0, "itm_weight": 0},
    ],
    ids=["encoder-decoder", "captioner"],
)
def test_gradient_accumulation_equals_the_larger_batch(tmp_path, data, parts):
    """Stage1Trainer's accumulation window on BLIP: the loss and the gradient of one batch of 8 (frozen tower: the ITM
    negatives' vision features are the pre-pass's; see stage1_accumulation)."""
    options = {"freeze_vision_tower": True, **parts}
    big, big_trainer = train_steps(tmp_path / "big", data, batch_size=8, accumulation=1, **options)
    acc, acc_trainer = train_steps(tmp_path / "acc", data, batch_size=4, accumulation=2, **options)
    big_log = next(entry for entry in big_trainer.state.log_history if "loss" in entry)
    acc_log = next(entry for entry in acc_trainer.state.log_history if "loss" in entry)
    assert acc_log["loss"] == pytest.approx(big_log["loss"], rel=1e-5)
    if "with_text_encoder" not in parts:
        assert acc_log["loss_itc"] == pytest.approx(big_log["loss_itc"], rel=1e-5)
    # SGD without momentum: equal parameters after the step mean equal gradients.
    moved = 0
    untrained = tokenizer_model(data[1], **options).state_dict()
    for (name, a), (_, b) in zip(big.named_parameters(), acc.named_parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)
        moved += not torch.equal(a, untrained[name])
    assert moved > 20, "nothing trained"


def test_momentum_distillation_refuses_accumulation_windows(tmp_path, data):
    with pytest.raises(ValueError, match="momentum distillation"):
        train_steps(tmp_path, data, batch_size=4, accumulation=2, use_momentum_distillation=True)


# ---------------------------------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------------------------------


def greedy_by_hand(model, pixel_values, max_new_tokens, prefix=()):
    """Greedy decoding from the decoder's full-prefix logits, one step at a time; rows padded after their EOS."""
    image_embeds = model.get_vision_features(pixel_values)
    ids = torch.tensor([[DEC_ID, *prefix]] * pixel_values.shape[0])
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model.compute_itg_logits(image_embeds, ids, torch.ones_like(ids))[:, -1]
        token = torch.where(done, torch.full_like(done, PAD_ID, dtype=torch.long), logits.argmax(-1))
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == EOS_ID
        if done.all():
            break
    return ids[:, 1 + len(prefix) :]


def test_greedy_captions_equal_a_hand_rolled_loop_cached_or_not():
    model = make_model(seed=3).eval()
    pixel_values = make_batch(batch_size=6)["pixel_values"]
    with torch.no_grad():
        expected = greedy_by_hand(model, pixel_values, 8)
    ended = (expected == EOS_ID).any(dim=1)
    assert ended.any() and not ended.all(), expected  # rows that stop early are padded; the others run on
    assert (expected[ended][:, -1] == PAD_ID).any()
    cached = model.generate_captions(pixel_values, max_new_tokens=8)
    uncached = model.generate_captions(pixel_values, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)
    with torch.no_grad():
        prompted = greedy_by_hand(model, pixel_values, 5, prefix=(10, 11))
    assert torch.equal(model.generate_captions(pixel_values, max_new_tokens=5, prompt_ids=[10, 11]), prompted)


def test_beam_search_and_nucleus_sampling_respect_their_options():
    model = make_model(seed=4).eval()
    pixel_values = make_batch(batch_size=2)["pixel_values"]
    beams = model.generate_captions(pixel_values, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 4
    torch.manual_seed(0)
    sampled = model.generate_captions(
        pixel_values, max_new_tokens=5, do_sample=True, top_p=0.9, num_return_sequences=3
    )
    assert sampled.shape[0] == 6
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[EOS_ID] += 50.0  # EOS wins every step unless forbidden
    assert (model.generate_captions(pixel_values, max_new_tokens=5)[:, 0] == EOS_ID).all()
    for options in ({}, {"num_beams": 3}, {"do_sample": True, "top_p": 0.9}):
        ids = model.generate_captions(pixel_values, max_new_tokens=6, min_new_tokens=3, **options)
        assert not (ids[:, :3] == EOS_ID).any() and (ids[:, 3] == EOS_ID).all(), options


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation and learning
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluate_stage1_reports_what_each_model_can_do(data):
    splits, tokenizer, collator = data
    rows = group_captions(splits["test"])
    full = evaluate_stage1(tokenizer_model(tokenizer).eval(), rows, collator, k_test=3, progress=False)
    assert {"i2t_r1", "t2i_r1", "itm_accuracy", "itg_exact", "samples"} <= set(full)
    captioner = tokenizer_model(
        tokenizer, with_text_encoder=False, share_encoder_decoder=False, itc_weight=0, itm_weight=0
    )
    only_captions = evaluate_stage1(captioner.eval(), rows, collator, k_test=3, progress=False)
    assert set(only_captions) == {"itg_exact", "samples"}
    matcher = tokenizer_model(tokenizer, with_text_decoder=False, share_encoder_decoder=False, itg_weight=0)
    only_matching = evaluate_stage1(matcher.eval(), rows, collator, k_test=3, progress=False)
    assert "itm_accuracy" in only_matching and "itg_exact" not in only_matching


def test_short_run_learns_on_the_built_in_shapes():
    """From scratch on CPU, 200 steps on 480 one-object scenes: the loss falls clearly and held-out ITM accuracy is far
    above chance (0.5; 0.83 to 0.89 over model seeds 0 to 2). ITM negatives are drawn uniformly (hardness 0): a
    from-scratch ITM head that only sees hard negatives stays on "no match" for long (Stage1Config ramps them)."""
    splits = make_synthetic_image_text(
        {"train": 480, "test": 100}, image_size=32, captions_per_image=1, max_objects=1, seed=0
    )
    tokenizer = build_word_tokenizer([*caption_vocabulary(), "[DEC]", "[ENC]"])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[1.0] * 3, image_std=[0.5] * 3
    )
    collator = ImageTextCollator(image_processor, tokenizer, max_length=16)
    model = tokenizer_model(tokenizer, text={"initializer_range": 0.1}, itc_weight=0.05)
    batches = [collator([splits["train"][i] for i in range(start, start + 32)]) for start in range(0, 480, 32)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    history = []
    for step in range(200):
        out = model(**batches[step % len(batches)], sampling_seed=step, itm_negative_hardness=0.0)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(out.loss.item())
    start, end = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert end < 0.5 * start, history[::20]
    rows = group_captions(splits["test"])
    metrics = evaluate_stage1(model, rows, collator, retrieval_style=None, k_test=4, progress=False)
    assert metrics["itm_accuracy"] > 0.7, metrics  # over 200 held-out pairs; chance is 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Docstring examples, the Q-Former model on the same module
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["vlbridge.modeling.modeling_blip_med", "vlbridge.configuration.configuration_blip_med"]
)
def test_docstring_examples(name):
    run_docstring_examples(name)


def test_both_stage1_models_run_the_one_objectives_module():
    from vlbridge.modeling.stage1_objectives import ImageTextPretrainingMixin

    for model_class in (QFormerForImageTextPretraining, BlipMEDForImageTextPretraining):
        assert issubclass(model_class, ImageTextPretrainingMixin)
        assert model_class.forward is ImageTextPretrainingMixin.forward
        assert model_class._itm is ImageTextPretrainingMixin._itm
