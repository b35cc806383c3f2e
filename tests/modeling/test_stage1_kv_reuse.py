"""Stage 1 projects the Q-Former's cross-attention keys / values of each image once per step and shares them between
the ITC, ITM and ITG passes (`reuse_image_key_values`), with the losses and gradients of the path that projects them
in every pass; and it takes the frozen tower's cached features (`vision_features`) in place of the pixels.

The comparisons run with dropout 0, so that they do not rest on both paths drawing their dropout masks in the same
order; they do (the key / value projections have no dropout, so reuse draws no random numbers), which one test with
dropout on checks as well."""

import pytest
import torch
from tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, bridge_config, vision_config
from transformers import CLIPImageProcessor

from vlbridge import (
    BlipMEDConfig,
    BlipMEDForImageTextPretraining,
    QFormerForImageTextPretraining,
    QFormerModel,
    QFormerPretrainingConfig,
)
from vlbridge.data import build_word_tokenizer, caption_vocabulary, make_synthetic_image_text
from vlbridge.modeling import stage1_losses as losses
from vlbridge.modeling.modeling_qformer import ATTENTION_MODES, ImageKeyValues
from vlbridge.modeling.stage1_accumulation import build_accumulation_window
from vlbridge.trainers import ImageTextCollator, Stage1Config, Stage1Trainer


DEC_ID = VOCAB_SIZE - 1
VISION_WIDTH = 48  # != the Q-Former's hidden size (32)
BATCH = 4
LOSSES = ("loss", "loss_itc", "loss_itm", "loss_itg")
# Reuse runs the same operations on other batch shapes (B rows projected instead of 5B, ITM's keys / values gathered
# by index); float32 rounding may differ in the last bits, nothing more.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}

pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(reuse: bool = True, seed: int = 0, dropout: float = 0.0, **overrides) -> QFormerForImageTextPretraining:
    """Three Q-Former layers with cross-attention in layers 0 and 2, dropout 0 unless told, weights perturbed so that
    every parameter matters."""
    torch.manual_seed(seed)
    config = QFormerPretrainingConfig(
        vision_config=vision_config(hidden_size=VISION_WIDTH),
        qformer_config=bridge_config(
            "qformer", num_hidden_layers=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
        ),
        embed_dim=16,
        decoder_start_token_id=DEC_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        reuse_image_key_values=reuse,
        **overrides,
    )
    model = QFormerForImageTextPretraining(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith(("vision_tower", "temp")) and not name.split(".")[0].endswith("_m"):
                param.add_(0.1 * torch.randn_like(param))
    if model.config.use_momentum_distillation:
        model.copy_params()
    return model.train()


def make_batch(batch_size: int = BATCH, seed: int = 1, image_ids=None) -> dict:
    """Captions of different lengths (text padding); captions with the same image id show the same pixels."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [(6, 4, 5, 3, 6, 2)[row % 6] for row in range(batch_size)]
    input_ids = torch.full((batch_size, 6), PAD_ID)
    for row, length in enumerate(lengths):
        input_ids[row, 0] = BOS_ID
        input_ids[row, 1 : length - 1] = torch.randint(5, 60, (length - 2,), generator=generator)
        input_ids[row, length - 1] = EOS_ID
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=generator)
    batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": (input_ids != PAD_ID).long()}
    if image_ids is not None:
        first = {}
        for row, image in enumerate(image_ids):
            pixel_values[row] = pixel_values[first.setdefault(image, row)]
        batch["image_ids"] = torch.tensor(image_ids)
    return batch


def train_step(model, batch: dict, **kwargs) -> tuple[dict, dict]:
    """One forward + backward; the losses and every parameter's gradient (None where it gets none)."""
    out = model(**batch, sampling_seed=0, **kwargs)
    out.loss.backward()
    found = {key: out[key].detach() for key in LOSSES if out.get(key) is not None}
    return found, {name: param.grad for name, param in model.named_parameters()}


def assert_same(expected: tuple[dict, dict], actual: tuple[dict, dict], exact: bool = False):
    (expected_losses, expected_grads), (actual_losses, actual_grads) = expected, actual
    assert expected_losses.keys() == actual_losses.keys()
    assert expected_grads.keys() == actual_grads.keys()
    tolerance = {"atol": 0.0, "rtol": 0.0} if exact else TOLERANCE
    for key, value in expected_losses.items():
        torch.testing.assert_close(actual_losses[key], value, **tolerance, msg=key)
    for name, grad in expected_grads.items():
        assert (grad is None) == (actual_grads[name] is None), name
        if grad is not None:
            torch.testing.assert_close(actual_grads[name], grad, **tolerance, msg=name)


def vision_features_batch(model, batch: dict) -> dict:
    """The batch with the frozen tower's features cached in place of its pixels."""
    batch = dict(batch)
    with torch.no_grad():
        batch["vision_features"] = model.get_vision_features(batch.pop("pixel_values")).float()
    return batch


def hook_key_rows(model) -> tuple[list[int], list]:
    """Rows each call of the Q-Former's cross-attention key layers projects (not the momentum Q-Former's)."""
    rows, handles = [], []
    for layer in model.qformer.encoder.layer:
        if layer.has_cross_attention:
            key = layer.crossattention.attention.key
            handles.append(key.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0])))
    return rows, handles


# ---------------------------------------------------------------------------------------------------------------------
# The Q-Former: keys / values in place of image features
# ---------------------------------------------------------------------------------------------------------------------


def tiny_qformer(**overrides) -> QFormerModel:
    torch.manual_seed(0)
    config = bridge_config("qformer", num_hidden_layers=3, encoder_hidden_size=16, **overrides)
    return QFormerModel(config).eval()


def qformer_inputs(batch_size: int = 3) -> dict:
    generator = torch.Generator().manual_seed(0)
    attention_mask = torch.ones(batch_size, 5, dtype=torch.long)
    attention_mask[1, 3:] = 0
    image_attention_mask = torch.ones(batch_size, 7, dtype=torch.long)
    image_attention_mask[2, 5:] = 0  # e.g. an unused any-res tile
    return {
        "input_ids": torch.randint(5, 60, (batch_size, 5), generator=generator),
        "attention_mask": attention_mask,
        "image_attention_mask": image_attention_mask,
    }


@pytest.mark.parametrize("attention_mode", ATTENTION_MODES)
def test_qformer_reads_image_key_values_as_it_reads_the_features(attention_mode):
    qformer, inputs = tiny_qformer(), qformer_inputs()
    image_embeds = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    key_values = qformer.image_key_values(image_embeds)
    assert sorted(key_values.layers) == [0, 2]  # the cross-attention layers (frequency 2)
    assert all(k.shape == v.shape == (3, 4, 7, 8) for k, v in key_values.layers.values())  # (B, heads, P, head_dim)
    assert len(key_values) == key_values.batch_size == 3 and key_values.num_features == 7
    with torch.no_grad():
        expected = qformer(image_embeds=image_embeds, attention_mode=attention_mode, **inputs).last_hidden_state
        actual = qformer(image_key_values=key_values, attention_mode=attention_mode, **inputs).last_hidden_state
        assert torch.equal(actual, expected)  # the same projections of the same rows

        # Indexing rows (repeats included) gives the keys / values of those images: ITM builds its pairs so.
        rows = torch.tensor([2, 0, 2])
        picked = {name: value[rows] for name, value in inputs.items()}
        expected = qformer(image_embeds=image_embeds[rows], attention_mode=attention_mode, **picked)
        for indexed in (key_values.index_select(rows), key_values[rows]):
            actual = qformer(image_key_values=indexed, attention_mode=attention_mode, **picked)
            torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, **TOLERANCE)
    joined = ImageKeyValues.cat([key_values[1:], key_values[:1]])
    for index, (key, value) in joined.layers.items():
        assert torch.equal(key, key_values.layers[index][0][[1, 2, 0]])
        assert torch.equal(value, key_values.layers[index][1][[1, 2, 0]])


def test_qformer_key_values_keep_eager_attention_weights_and_autocast():
    qformer, inputs = tiny_qformer(), qformer_inputs()
    qformer.set_attn_implementation("eager")
    image_embeds = torch.randn(3, 7, 16)
    with torch.no_grad():
        expected = qformer(image_embeds=image_embeds, output_attentions=True, **inputs)
        actual = qformer(image_key_values=qformer.image_key_values(image_embeds), output_attentions=True, **inputs)
    assert len(actual.cross_attentions) == 2
    for got, want in zip(actual.cross_attentions, expected.cross_attentions):
        assert torch.equal(got, want)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        key_values = qformer.image_key_values(image_embeds)  # projected in the autocast dtype, as in a pass
        assert key_values.layers[0][0].dtype == torch.bfloat16
        expected = qformer(image_embeds=image_embeds, **inputs).last_hidden_state
        actual = qformer(image_key_values=key_values, **inputs).last_hidden_state
    assert torch.equal(actual, expected)


def test_qformer_refuses_key_values_it_cannot_use():
    qformer, inputs = tiny_qformer(), qformer_inputs()
    image_embeds = torch.randn(3, 7, 16)
    key_values = qformer.image_key_values(image_embeds)
    with pytest.raises(ValueError, match="only one of them"):
        qformer(image_embeds=image_embeds, image_key_values=key_values)
    with pytest.raises(ValueError, match="input_ids has batch size 2, image_key_values 3"):
        qformer(image_key_values=key_values, input_ids=inputs["input_ids"][:2])
    with pytest.raises(ValueError, match="text-only pass"):
        qformer(image_key_values=key_values, input_ids=inputs["input_ids"], use_queries=False)
    other = tiny_qformer(cross_attention_frequency=1)  # cross-attention in every layer
    with pytest.raises(ValueError, match=r"cross-attention layers \[0, 1, 2\]"):
        other(image_key_values=key_values)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        qformer.image_key_values(torch.randn(3, 7, 15))


# ---------------------------------------------------------------------------------------------------------------------
# The stage-1 step: the same losses and gradients, fewer projections
# ---------------------------------------------------------------------------------------------------------------------

SCENARIOS = {
    "plain": ({}, {}, {}),
    "duplicate_image_ids": ({}, {"image_ids": [7, 7, 3, 5]}, {}),
    "momentum_distillation": ({"use_momentum_distillation": True, "queue_size": 8}, {"image_ids": [1, 2, 1, 3]}, {}),
    "softened_hard_negatives": ({}, {}, {"itm_negative_hardness": 0.5}),
    "trainable_vision_tower": ({"freeze_vision_tower": False}, {}, {}),
    "weighted_losses": ({"itm_weight": 0.5, "itg_weight": 2.0}, {"batch_size": 6}, {}),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_reuse_gives_the_losses_and_gradients_of_the_path_without(scenario):
    overrides, batch_options, forward_options = SCENARIOS[scenario]
    batch = make_batch(**batch_options)
    results, models = [], []
    for reuse in (False, True):
        model = make_model(reuse, **overrides)
        results.append(train_step(model, batch, **forward_options))
        models.append(model)
    assert_same(*results)
    if overrides.get("use_momentum_distillation"):  # the momentum Q-Former (its own keys / values) fills the queues
        for name in ("image_queue", "text_queue", "image_id_queue", "queue_ptr"):
            torch.testing.assert_close(getattr(models[1], name), getattr(models[0], name), **TOLERANCE, msg=name)


def test_reuse_draws_no_random_numbers_so_dropout_masks_match():
    batch = make_batch()
    results = []
    for reuse in (False, True):
        model = make_model(reuse, dropout=0.1)
        torch.manual_seed(5)  # the same dropout draws in the same order on both paths
        results.append(train_step(model, batch))
    assert_same(*results)


def test_reuse_under_bf16_autocast_matches_the_path_without():
    batch = make_batch()
    results = []
    for reuse in (False, True):
        model = make_model(reuse)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch, sampling_seed=0)
        out.loss.backward()
        results.append((out, model.qformer.encoder.layer[0].crossattention.attention.key.weight.grad))
    (plain, plain_grad), (reused, reused_grad) = results
    for key in LOSSES:
        torch.testing.assert_close(reused[key], plain[key], atol=1e-2, rtol=1e-2)  # bf16 rounding of other shapes
    torch.testing.assert_close(reused_grad, plain_grad, atol=1e-2, rtol=5e-2)


def test_reentrant_gradient_checkpointing_keeps_the_key_value_gradients():
    # Reentrant checkpointing backpropagates only into a layer's positional tensors: the keys / values are passed so.
    batch = make_batch()
    reference = train_step(make_model(), batch)
    model = make_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed = train_step(model, batch)
    assert checkpointed[1]["qformer.encoder.layer.0.crossattention.attention.key.weight"].abs().sum() > 0
    assert_same(reference, checkpointed)


def test_one_projection_of_the_batch_per_step_instead_of_five():
    batch = make_batch(image_ids=[7, 7, 3, 5])
    counts = {}
    for reuse in (False, True):
        model = make_model(reuse, use_momentum_distillation=True, queue_size=8)
        rows, handles = hook_key_rows(model)
        model(**batch, sampling_seed=0).loss.backward()
        for handle in handles:
            handle.remove()
        counts[reuse] = rows
    # Without reuse every cross-attention layer projects ITC's B, ITM's 3B and ITG's B rows; with it, B once.
    assert sorted(counts[False]) == sorted([BATCH, 3 * BATCH, BATCH] * 2)
    assert counts[True] == [BATCH, BATCH]


def test_itm_pairs_index_the_batch_key_values(monkeypatch):
    model = make_model(itg_weight=0)
    batch = make_batch(image_ids=[4, 4, 9, 6])
    captured = {}
    original_sample, original_itm = losses.sample_hard_negatives, model.compute_itm_logits

    def spy_sample(similarity, mask, generator=None, hardness=1.0):
        index = original_sample(similarity, mask, generator, hardness)
        captured.setdefault("draws", []).append(index)
        return index

    def spy_itm(images, input_ids, attention_mask, image_key_values=None):
        captured.update(images=images, key_values=image_key_values)
        return original_itm(images, input_ids, attention_mask, image_key_values=image_key_values)

    monkeypatch.setattr(losses, "sample_hard_negatives", spy_sample)
    monkeypatch.setattr(model, "compute_itm_logits", spy_itm)
    model(**batch, sampling_seed=0)
    negative_images = captured["draws"][0]
    assert captured["images"] is None  # the pairs' images come as keys / values only
    with torch.no_grad():
        own = model.qformer.image_key_values(model.get_vision_features(batch["pixel_values"]))
    rows = torch.arange(BATCH)
    expected = own.index_select(torch.cat([rows, negative_images, rows]))  # [positives; negative images; positives]
    for index, (key, value) in captured["key_values"].layers.items():
        torch.testing.assert_close(key, expected.layers[index][0], rtol=0, atol=0)
        torch.testing.assert_close(value, expected.layers[index][1], rtol=0, atol=0)


def accumulate(model, halves: list[dict], seed: int = 3) -> tuple[dict, dict]:
    """Both micro-batches of an accumulation window, as `Stage1Trainer` runs them: summed losses, gradients."""
    window = build_accumulation_window(model, halves, seed)
    totals = {}
    for index, half in enumerate(halves):
        window.index = index
        found, grads = train_step(model, half, accumulation_window=window)
        for key, value in found.items():
            totals[key] = totals.get(key, 0.0) + value
    return totals, grads


def halves_of(batch: dict) -> list[dict]:
    return [{key: value[:4] for key, value in batch.items()}, {key: value[4:] for key, value in batch.items()}]


@pytest.mark.parametrize("trainable_tower", [False, True])
def test_accumulation_window_with_reuse_matches_the_path_without(trainable_tower):
    halves = halves_of(make_batch(8, image_ids=[0, 1, 0, 2, 3, 3, 4, 5]))
    results, counts = [], []
    for reuse in (False, True):
        model = make_model(reuse, freeze_vision_tower=not trainable_tower)
        rows, handles = hook_key_rows(model)
        results.append(accumulate(model, halves))
        counts.append(rows)
        for handle in handles:
            handle.remove()
    assert_same(*results)
    # Per cross-attention layer: the pre-pass's ITC (4 + 4, no grad), then per micro-batch 5 x 4 rows without reuse,
    # and with it the micro-batch's own 4 plus its 4 negative images (from any micro-batch of the window).
    assert sum(counts[0]) == 2 * (8 + 2 * 5 * 4) and sum(counts[1]) == 2 * (8 + 2 * 2 * 4)


# ---------------------------------------------------------------------------------------------------------------------
# vision_features: the frozen tower's cached features in place of the pixels
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"reuse_image_key_values": False}, {"use_momentum_distillation": True, "queue_size": 8}],
    ids=["reuse", "no_reuse", "momentum_distillation"],
)
def test_vision_features_give_bit_identical_losses_and_gradients(overrides):
    batch = make_batch(image_ids=[7, 7, 3, 5])
    reuse = overrides.pop("reuse_image_key_values", True)
    from_pixels = train_step(make_model(reuse, **overrides), batch)
    model = make_model(reuse, **overrides)
    from_features = train_step(model, vision_features_batch(model, batch))
    assert_same(from_pixels, from_features, exact=True)


def test_vision_features_are_cast_to_the_tower_dtype():
    # An fp32 cache of a bf16 tower's features holds exactly the bf16 values: cast back, the losses are the same.
    batch = make_batch()
    results = []
    for use_cache in (False, True):
        model = make_model()
        model.vision_tower.to(torch.bfloat16)
        results.append(train_step(model, vision_features_batch(model, batch) if use_cache else batch))
    assert_same(*results, exact=True)


def test_vision_features_through_the_accumulation_window():
    batch = make_batch(8, image_ids=[0, 1, 0, 2, 3, 3, 4, 5])
    from_pixels = accumulate(make_model(), halves_of(batch))
    model = make_model()
    from_features = accumulate(model, halves_of(vision_features_batch(model, batch)))
    assert_same(from_pixels, from_features, exact=True)


def test_stage1_trainer_takes_vision_features_from_the_collator(tmp_path):
    """A collator that puts cached features in the batch instead of pixels: the same accumulated step."""
    splits = make_synthetic_image_text({"train": 8}, image_size=32, captions_per_image=1)
    tokenizer = build_word_tokenizer([*caption_vocabulary(), "[DEC]"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    collator = ImageTextCollator(image_processor, tokenizer, max_length=24)
    results = []
    for cached in (False, True):
        torch.manual_seed(0)
        config = QFormerPretrainingConfig(
            vision_config=vision_config(hidden_size=VISION_WIDTH),
            qformer_config=bridge_config("qformer", vocab_size=len(tokenizer), hidden_dropout_prob=0.0),
            embed_dim=16,
            decoder_start_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = QFormerForImageTextPretraining(config)
        initial = model.qformer.query_tokens.detach().clone()

        def collate(rows, model=model, cached=cached):
            batch = collator(rows)
            return vision_features_batch(model, batch) if cached else batch

        args = Stage1Config(
            str(tmp_path / str(cached)),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,  # the accumulation window's pre-pass reads the batches' features too
            max_steps=1,
            learning_rate=0.5,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            save_strategy="no",
            report_to="none",
            seed=0,
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Stage1Trainer(model=model, args=args, train_dataset=splits["train"], data_collator=collate)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(splits["train"])
        trainer.train()
        assert not torch.equal(model.qformer.query_tokens, initial)  # the step trained
        results.append(dict(model.named_parameters()))
    for name, param in results[0].items():
        assert torch.equal(results[1][name], param), name


def test_bad_image_inputs_name_the_fix():
    model = make_model()
    batch = make_batch()
    features = vision_features_batch(model, batch)["vision_features"]  # (4, 17, 48)
    text = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with pytest.raises(ValueError, match="exactly one of pixel_values .* got both"):
        model(**batch, vision_features=features)
    with pytest.raises(ValueError, match="exactly one of pixel_values .* got neither"):
        model(**text)
    with pytest.raises(ValueError, match=r"\(batch_size, num_features, 48\).* got \(4, 17, 47\)"):
        model(**text, vision_features=features[..., :47])
    with pytest.raises(ValueError, match=r"\(batch_size, num_features, 48\).* got \(4, 48\)"):
        model(**text, vision_features=features[:, 0])
    with pytest.raises(ValueError, match="3 images for 4 captions"):
        model(**text, vision_features=features[:3])
    with pytest.raises(ValueError, match="floating point"):
        model(**text, vision_features=features.long())
    with pytest.raises(ValueError, match="input_ids are required"):
        model(vision_features=features)
    trainable = make_model(freeze_vision_tower=False)
    with pytest.raises(ValueError, match="trains its tower.*freeze_vision_tower=True"):
        trainable(**text, vision_features=features)
    # Without gradients (evaluation, the accumulation pre-pass) the features are just an input, as in the VLM.
    with torch.no_grad():
        assert trainable(**text, vision_features=features, return_loss=False).logits_per_image.shape == (4, 4)


def blip_model(freeze_vision_tower: bool) -> BlipMEDForImageTextPretraining:
    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    text.update(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=DEC_ID - 1, eos_token_id=EOS_ID)
    vision = {"model_type": "blip_vision_model", "hidden_size": VISION_WIDTH, "intermediate_size": 96}
    vision.update(num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8, initializer_range=0.02)
    config = BlipMEDConfig(
        vision_config=vision,
        text_config=text,
        embed_dim=16,
        decoder_start_token_id=DEC_ID - 1,
        enc_token_id=DEC_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        use_momentum_distillation=False,
        freeze_vision_tower=freeze_vision_tower,
    )
    return BlipMEDForImageTextPretraining(config).train()


def test_blip_med_shares_the_inputs_but_not_the_key_value_reuse():
    batch = make_batch()
    model = blip_model(freeze_vision_tower=True)
    assert model._image_key_values(torch.randn(2, 17, VISION_WIDTH)) is None  # BLIP's passes read the features
    from_pixels = train_step(model, batch)
    model = blip_model(freeze_vision_tower=True)
    assert_same(from_pixels, train_step(model, vision_features_batch(model, batch)), exact=True)
    with pytest.raises(ValueError, match="trains its tower"):  # BLIP trains its tower by default
        blip_model(freeze_vision_tower=False)(**vision_features_batch(model, batch))


def test_reuse_flag_round_trips_and_defaults_on_for_old_configs(tmp_path):
    make_model(reuse=False).config.save_pretrained(tmp_path / "off")
    assert QFormerPretrainingConfig.from_pretrained(tmp_path / "off").reuse_image_key_values is False
    config = make_model().config.to_dict()
    config.pop("reuse_image_key_values")  # a config saved before the flag existed
    assert QFormerPretrainingConfig.from_dict(config).reuse_image_key_values is True
