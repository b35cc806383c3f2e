"""Tests of BLIP-2 stage 1: `QFormerPretrainingConfig`, `QFormerForImageTextPretraining` (ITC / ITM / ITG, momentum
distillation, captioning), the cross-process gathers, BERT initialisation and the hand-off to the stage-2 VLM."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import run_docstring_examples
from tiny import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, VOCAB_SIZE, bridge_config, text_config, vision_config
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, BertConfig, BertForMaskedLM, BertModel
from transformers.utils import can_return_loss, find_labels

from vlbridge import (
    BridgeVLMConfig,
    BridgeVLMForConditionalGeneration,
    QFormerForImageTextPretraining,
    QFormerModel,
    QFormerPretrainingConfig,
    load_qformer_into_vlm,
)
from vlbridge.conversion.bert import add_decoder_start_token, pretraining_model_from_bert, qformer_from_bert
from vlbridge.modeling import stage1_losses as losses


DEC_ID = VOCAB_SIZE - 1  # stands for BLIP-2's [DEC]; unused by the tiny tokenizer
VISION_WIDTH = 48  # != the Q-Former's hidden size (32)
BATCH = 4


pytestmark = pytest.mark.usefixtures("single_thread")


def make_config(**overrides) -> QFormerPretrainingConfig:
    qformer_overrides = overrides.pop("qformer", {})
    return QFormerPretrainingConfig(
        vision_config=vision_config(hidden_size=VISION_WIDTH),
        qformer_config=bridge_config(
            "qformer", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **qformer_overrides
        ),
        embed_dim=16,
        decoder_start_token_id=DEC_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        **overrides,
    )


def make_model(seed: int = 0, **overrides) -> QFormerForImageTextPretraining:
    torch.manual_seed(seed)
    model = QFormerForImageTextPretraining(make_config(**overrides))
    with torch.no_grad():  # LayerNorms start at 1 / 0 and heads near 0: perturb so that every parameter matters
        for name, param in model.named_parameters():
            if not name.startswith(("vision_tower", "temp")) and not name.split(".")[0].endswith("_m"):
                param.add_(0.1 * torch.randn_like(param))
    if model.config.use_momentum_distillation:
        model.copy_params()
    return model


def make_batch(batch_size: int = BATCH, seed: int = 1, image_ids=None, share_pixels: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    lengths = [6, 4, 5, 3, 6, 2][:batch_size] + [5] * max(0, batch_size - 6)
    input_ids = torch.full((batch_size, 6), PAD_ID)
    for row, length in enumerate(lengths):
        input_ids[row, 0] = BOS_ID
        input_ids[row, 1 : length - 1] = torch.randint(5, 60, (length - 2,), generator=generator)
        input_ids[row, length - 1] = EOS_ID
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=generator)
    if image_ids is not None and share_pixels:  # captions of the same image show the same pixels
        first = {}
        for row, image in enumerate(image_ids):
            pixel_values[row] = pixel_values[first.setdefault(image, row)]
    batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": (input_ids != PAD_ID).long()}
    if image_ids is not None:
        batch["image_ids"] = torch.tensor(image_ids)
    return batch


def hand_itc_loss(image_feats, text_feats, temp, targets):
    """ITC from its definition, with explicit loops for the best query."""
    num_images, num_texts = image_feats.shape[0], text_feats.shape[0]
    sim = torch.empty(num_images, num_texts)
    for i in range(num_images):
        for t in range(num_texts):
            sim[i, t] = max(float(image_feats[i, q] @ text_feats[t]) for q in range(image_feats.shape[1])) / temp
    loss_i2t = -(targets * sim.log_softmax(1)).sum(1).mean()
    loss_t2i = -(targets * sim.t().log_softmax(1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, sim


# ---------------------------------------------------------------------------------------------------------------------
# Config, outputs, gradients, save / load
# ---------------------------------------------------------------------------------------------------------------------


def test_config_derives_width_round_trips_and_validates(tmp_path):
    config = make_config(itm_weight=0.5)
    assert config.qformer_config.encoder_hidden_size == VISION_WIDTH
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, QFormerPretrainingConfig) and loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.get_text_config() is loaded.qformer_config
    with pytest.raises(Exception, match="use_text_input=True"):
        make_config(qformer={"use_text_input": False})
    with pytest.raises(Exception, match="temperature_min"):
        make_config(temperature_init=0.9)
    with pytest.raises(Exception, match="outside the Q-Former's vocabulary"):
        make_config(qformer={"vocab_size": 50})  # DEC_ID = 95


def test_output_shapes_keys_and_weighted_loss():
    model = make_model(itm_weight=0.5, itg_weight=2.0).train()
    batch = make_batch()
    out = model(**batch)
    num_queries, text_length = model.config.qformer_config.num_query_tokens, batch["input_ids"].shape[1]
    assert out.logits_per_image.shape == out.logits_per_text.shape == (BATCH, BATCH)
    assert out.itm_logits.shape == (3 * BATCH, 2)
    assert out.itm_labels.tolist() == [1] * BATCH + [0] * 2 * BATCH
    accuracy = (out.itm_logits.argmax(-1) == out.itm_labels).float().mean()
    assert out.itm_accuracy == accuracy and out.temperature == pytest.approx(0.07)
    assert out.itg_logits.shape == (BATCH, text_length, VOCAB_SIZE)
    assert out.image_embeds.shape == (BATCH, num_queries, 16) and out.text_embeds.shape == (BATCH, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(BATCH, num_queries))
    for name in ("loss", "loss_itc", "loss_itm", "loss_itg"):
        assert out[name].ndim == 0 and torch.isfinite(out[name]), name
    torch.testing.assert_close(out.loss, out.loss_itc + 0.5 * out.loss_itm + 2.0 * out.loss_itg)

    local = model(**batch, return_loss=False)
    assert local.loss is None and local.itm_logits is None and local.logits_per_image.shape == (BATCH, BATCH)
    skipped = make_model(itm_weight=0, itg_weight=0)(**batch)
    assert skipped.loss_itm is None and skipped.loss_itg is None
    torch.testing.assert_close(skipped.loss, skipped.loss_itc)


def test_trainer_contract():
    assert can_return_loss(QFormerForImageTextPretraining)  # HF Trainer computes eval_loss without a labels key
    assert find_labels(QFormerForImageTextPretraining) == []
    assert QFormerForImageTextPretraining.accepts_loss_kwargs is False
    assert "itg_logits" in QFormerPretrainingConfig.keys_to_ignore_at_inference


@pytest.mark.parametrize("loss_name", ["loss_itc", "loss_itm", "loss_itg"])
def test_each_loss_backprops_into_its_parts_but_not_the_frozen_tower(loss_name):
    model = make_model().train()
    assert not model.vision_tower.training and model.qformer.training  # the frozen tower stays in eval mode
    getattr(model(**make_batch()), loss_name).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vision_tower.parameters())
    expected = {
        "loss_itc": ["temp", "vision_proj.weight", "text_proj.weight", "qformer.query_tokens"],
        "loss_itm": ["itm_head.weight", "qformer.query_tokens", "qformer.encoder.layer.0.crossattention"],
        "loss_itg": ["lm_head.dense.weight", "lm_head.decoder.bias", "qformer.embeddings.word_embeddings"],
    }[loss_name]
    grads = {name: param.grad for name, param in model.named_parameters()}
    for prefix in expected:
        hits = [g for name, g in grads.items() if name.startswith(prefix) and g is not None and g.abs().sum() > 0]
        assert hits, f"{loss_name} gives no gradient to {prefix}"


def test_what_never_trains_stays_frozen_after_from_pretrained(tmp_path):
    # Loading puts fresh parameters in place: the frozen tower and the momentum copies must be frozen again.
    model = make_model(use_momentum_distillation=True, queue_size=4)
    model.save_pretrained(tmp_path)
    loaded = QFormerForImageTextPretraining.from_pretrained(tmp_path).train()
    assert not any(p.requires_grad for p in loaded.vision_tower.parameters())
    assert not any(p.requires_grad for name, p in loaded.named_parameters() if "_m." in name)
    assert loaded.qformer.query_tokens.requires_grad and not loaded.vision_tower.training
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in model.named_parameters() if p.requires_grad}


def test_trainable_vision_tower_gets_gradients():
    model = make_model(freeze_vision_tower=False).train()
    assert model.vision_tower.training
    model(**make_batch()).loss.backward()
    # Every tower weight but CLIP's post_layernorm (it only feeds the pooled output, which BLIP-2 does not read).
    used = [p for n, p in model.vision_tower.named_parameters() if "post_layernorm" not in n]
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in used)


def test_save_load_bit_exact_and_tied(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path)
    for auto_class in (AutoModel, AutoModelForPreTraining):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert type(loaded) is QFormerForImageTextPretraining
        original, reloaded = model.state_dict(), loaded.state_dict()
        assert original.keys() == reloaded.keys()
        assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert loaded.lm_head.decoder.weight is loaded.qformer.embeddings.word_embeddings.weight
    batch = make_batch()
    torch.manual_seed(0)
    expected = model(**batch)
    torch.manual_seed(0)
    actual = loaded(**batch)
    for key in ("loss", "logits_per_image", "itm_logits", "itg_logits"):
        assert torch.equal(expected[key], actual[key]), key


def test_bf16_load_keeps_trainable_parts_fp32(tmp_path):
    make_model().save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16).train()
    assert model.vision_tower.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if not n.startswith("vision_tower"))
    out = model(**make_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.qformer.query_tokens.grad.dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = make_batch()
    results = []
    for checkpointing in (False, True):
        model = make_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(3)
        out = model(**batch)
        out.loss.backward()
        results.append((out.loss.detach(), model.qformer.query_tokens.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_resize_token_embeddings_keeps_the_tie_and_config():
    model = make_model(use_momentum_distillation=True, queue_size=8)
    model.resize_token_embeddings(VOCAB_SIZE + 4)
    assert model.config.qformer_config.vocab_size == VOCAB_SIZE + 4
    assert model.lm_head.decoder.weight is model.qformer.embeddings.word_embeddings.weight
    assert model.lm_head.decoder.bias.shape == (VOCAB_SIZE + 4,)
    torch.testing.assert_close(model.qformer_m.get_input_embeddings().weight, model.get_input_embeddings().weight)


# ---------------------------------------------------------------------------------------------------------------------
# ITC
# ---------------------------------------------------------------------------------------------------------------------


def test_itc_matches_hand_computation():
    model = make_model(itm_weight=0, itg_weight=0).eval()
    batch = make_batch()
    out = model(**batch)
    # The single `unimodal` pass gives the features of LAVIS' two separate passes.
    with torch.no_grad():
        image_feats = model.get_image_features(batch["pixel_values"])
        text_feats = model.get_text_features(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(out.image_embeds, image_feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_embeds, text_feats, atol=1e-5, rtol=1e-5)

    targets = 0.9 * torch.eye(BATCH) + 0.1 / BATCH  # label smoothing 0.1 on the diagonal
    expected, sim = hand_itc_loss(image_feats, text_feats, 0.07, targets)
    torch.testing.assert_close(out.logits_per_image.detach(), sim, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.logits_per_text.detach(), sim.t(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.loss_itc.detach(), expected, atol=1e-5, rtol=1e-5)
    y = torch.arange(BATCH)
    as_ce = (F.cross_entropy(sim, y, label_smoothing=0.1) + F.cross_entropy(sim.t(), y, label_smoothing=0.1)) / 2
    torch.testing.assert_close(out.loss_itc.detach(), as_ce, atol=1e-5, rtol=1e-5)


def test_captions_of_the_same_image_are_not_negatives():
    image_ids = [7, 7, 3, 5]  # captions 0 and 1 describe the same image
    model = make_model(itm_weight=0, itg_weight=0).eval()
    # Two differently augmented views of it (with identical pixels both targets would give the same loss value).
    batch = make_batch(image_ids=image_ids, share_pixels=False)
    out = model(**batch)
    positives = losses.positive_mask(BATCH, BATCH, 0, batch["image_ids"], batch["image_ids"])
    assert positives.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    targets = losses.contrastive_targets(positives, 0.1)
    assert torch.allclose(targets[0], torch.tensor([0.475, 0.475, 0.025, 0.025]))  # 0.9 * 1/2 + 0.1 / 4
    with torch.no_grad():
        image_feats = model.get_image_features(batch["pixel_values"])
        text_feats = model.get_text_features(batch["input_ids"], batch["attention_mask"])
    expected, _ = hand_itc_loss(image_feats, text_feats, 0.07, targets)
    torch.testing.assert_close(out.loss_itc.detach(), expected, atol=1e-5, rtol=1e-5)
    diagonal, _ = hand_itc_loss(image_feats, text_feats, 0.07, 0.9 * torch.eye(BATCH) + 0.1 / BATCH)
    assert not torch.allclose(out.loss_itc.detach(), diagonal, atol=1e-3)


def test_temperature_is_clamped_into_range():
    model = make_model(itm_weight=0, itg_weight=0).eval()
    batch = make_batch()
    for value, clamped in ((5.0, 0.5), (1e-6, 0.001), (0.2, 0.2)):
        with torch.no_grad():
            model.temp.fill_(value)
        out = model(**batch)
        assert model.temp.item() == pytest.approx(clamped)
        cosine = losses.query_text_similarity(out.image_embeds, out.text_embeds)
        torch.testing.assert_close(out.logits_per_image, cosine / clamped, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# ITM
# ---------------------------------------------------------------------------------------------------------------------


def test_hard_negatives_never_hit_positives_or_same_image_pairs():
    image_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    positives = losses.positive_mask(7, 7, 0, image_ids, image_ids)
    similarity = torch.randn(7, 7, generator=torch.Generator().manual_seed(0))
    similarity[positives] += 100.0  # positives are by far the most similar: they must still never be drawn
    drawn = torch.zeros(7, 7, dtype=torch.bool)
    for seed in range(300):
        index = losses.sample_hard_negatives(similarity, positives, torch.Generator().manual_seed(seed))
        drawn[torch.arange(7), index] = True
    assert not (drawn & positives).any()
    assert (drawn == ~positives).all()  # every real negative can be drawn
    with pytest.raises(ValueError, match="needs a negative"):
        losses.sample_hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))


def test_hardness_zero_draws_negatives_uniformly_and_one_prefers_similar():
    similarity = torch.tensor([[10.0, 9.0, 0.0, 0.0]]).repeat(4000, 1)
    positives = torch.zeros_like(similarity, dtype=torch.bool)
    positives[:, 0] = True
    generator = torch.Generator().manual_seed(0)
    uniform = losses.sample_hard_negatives(similarity, positives, generator, hardness=0.0)
    counts = torch.bincount(uniform, minlength=4) / len(uniform)
    assert counts[0] == 0 and torch.allclose(counts[1:], torch.full((3,), 1 / 3), atol=0.03)
    hard = losses.sample_hard_negatives(similarity, positives, generator, hardness=1.0)
    assert (hard == 1).float().mean() > 0.99  # e^9 against 2 e^0
    with pytest.raises(ValueError, match="non-negative"):
        losses.sample_hard_negatives(similarity, positives, generator, hardness=-1.0)


def test_itm_pairs_layout_through_the_model(monkeypatch):
    image_ids = [4, 4, 9, 6]
    # The pairs' images as features: the path without key / value reuse (its pair layout is checked in
    # test_stage1_kv_reuse.py).
    model = make_model(itg_weight=0, reuse_image_key_values=False).train()
    batch = make_batch(image_ids=image_ids)
    positives = losses.positive_mask(BATCH, BATCH, 0, batch["image_ids"], batch["image_ids"])
    captured = {}
    original_sample, original_itm = losses.sample_hard_negatives, model.compute_itm_logits

    def spy_sample(similarity, mask, generator=None, hardness=1.0):
        index = original_sample(similarity, mask, generator, hardness)
        captured.setdefault("draws", []).append(index)
        assert torch.equal(mask.cpu(), positives)
        return index

    def spy_itm(images, input_ids, attention_mask):
        captured.update(images=images, input_ids=input_ids, attention_mask=attention_mask)
        return original_itm(images, input_ids, attention_mask)

    monkeypatch.setattr(losses, "sample_hard_negatives", spy_sample)
    monkeypatch.setattr(model, "compute_itm_logits", spy_itm)
    for seed in range(5):
        torch.manual_seed(seed)
        captured.clear()
        model(**batch)
        negative_images, negative_texts = captured["draws"]
        rows = torch.arange(BATCH)
        assert not positives[rows, negative_images].any() and not positives[rows, negative_texts].any()
        image_embeds = model.get_vision_features(batch["pixel_values"])
        images, ids = captured["images"], captured["input_ids"]
        # texts [positive, positive, negative], images [positive, negative, positive] (LAVIS)
        assert torch.equal(images[:BATCH], image_embeds) and torch.equal(images[2 * BATCH :], image_embeds)
        assert torch.equal(images[BATCH : 2 * BATCH], image_embeds[negative_images])
        assert torch.equal(ids[:BATCH], batch["input_ids"]) and torch.equal(ids[BATCH : 2 * BATCH], batch["input_ids"])
        assert torch.equal(ids[2 * BATCH :], batch["input_ids"][negative_texts])
        assert torch.equal(captured["attention_mask"][2 * BATCH :], batch["attention_mask"][negative_texts])


def test_itm_logits_average_the_queries():
    model = make_model().eval()
    batch = make_batch()
    image_embeds = model.get_vision_features(batch["pixel_values"])
    logits = model.compute_itm_logits(image_embeds, batch["input_ids"], batch["attention_mask"])
    queries = model.qformer(
        image_embeds=image_embeds, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).image_tokens
    torch.testing.assert_close(logits, model.itm_head(queries).mean(1))


# ---------------------------------------------------------------------------------------------------------------------
# ITG and captioning
# ---------------------------------------------------------------------------------------------------------------------


def test_itg_mask_is_multimodal_causal():
    model = make_model().eval()
    batch = make_batch()
    image_embeds = model.get_vision_features(batch["pixel_values"])
    ids = batch["input_ids"].clone()
    ids[:, 0] = DEC_ID
    logits = model.compute_itg_logits(image_embeds, ids)
    perturbed = ids.clone()
    perturbed[:, 3] = 59
    changed = model.compute_itg_logits(image_embeds, perturbed)
    torch.testing.assert_close(changed[:, :3], logits[:, :3])  # earlier positions never see a later token
    assert not torch.allclose(changed[:, 3:], logits[:, 3:])
    other_image = model.compute_itg_logits(image_embeds.flip(0), ids)
    assert not torch.allclose(other_image[:, 0], logits[:, 0])  # the text reads the image through the queries


def test_itg_loss_reference_ignores_padding_and_first_token():
    model = make_model(itm_weight=0).eval()
    batch = make_batch()
    out = model(**batch)
    decoder_ids = batch["input_ids"].clone()
    decoder_ids[:, 0] = DEC_ID
    image_embeds = model.get_vision_features(batch["pixel_values"])
    logits = model.compute_itg_logits(image_embeds, decoder_ids, batch["attention_mask"])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    expected = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=0.1
    )
    torch.testing.assert_close(out.loss_itg, expected)

    padded = batch["input_ids"].clone()
    padded[batch["attention_mask"] == 0] = 42  # garbage under the padding
    assert torch.equal(model(**{**batch, "input_ids": padded}).loss_itg, out.loss_itg)
    first = batch["input_ids"].clone()
    first[:, 0] = 17  # replaced by [DEC] for ITG
    torch.testing.assert_close(model(**{**batch, "input_ids": first}).loss_itg, out.loss_itg)


def test_generate_captions_is_greedy():
    # Beam search, sampling, EOS padding and the KV cache: tests/modeling/test_qformer_captioning.py.
    model = make_model().eval()
    pixel_values = make_batch()["pixel_values"][:2]
    generated = model.generate_captions(pixel_values, max_new_tokens=6)
    # Reference greedy loop.
    image_embeds = model.get_vision_features(pixel_values)
    ids = torch.full((2, 1), DEC_ID)
    for _ in range(6):
        next_ids = model.compute_itg_logits(image_embeds, ids)[:, -1].argmax(-1)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
    eos_free = (ids[:, 1:] != EOS_ID).all()
    if eos_free:
        assert torch.equal(generated, ids[:, 1:])


# ---------------------------------------------------------------------------------------------------------------------
# Gathers
# ---------------------------------------------------------------------------------------------------------------------


def test_gathers_are_identity_in_one_process():
    assert losses.world_info() == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    gathered = losses.all_gather_with_grad(x)
    assert gathered is x
    (gathered * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 2), 2.0))
    assert not losses.concat_all_gather(x).requires_grad
    ids = torch.tensor([[1, 2, 0]])
    assert torch.equal(losses.gather_padded(ids, 0), ids)


_GATHER_WORKER = textwrap.dedent(
    """
    import importlib.util, sys
    import torch, torch.distributed as dist

    # Load the torch-only module by path: importing `vlbridge` would pull in transformers and slow the workers.
    spec = importlib.util.spec_from_file_location("stage1_losses", sys.argv[1])
    losses = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(losses)
    rank = int(sys.argv[3])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    x = (torch.arange(6.0).view(3, 2) + 10 * rank).requires_grad_()
    gathered = losses.all_gather_with_grad(x)
    weights = torch.arange(12.0).view(6, 2) * (rank + 1)  # each rank's loss weighs the global batch differently
    (gathered * weights).sum().backward()
    ids = torch.ones(2, 2 + rank, dtype=torch.long)  # rank 1's texts are longer
    padded = losses.gather_padded(ids, pad_value=0)
    torch.save({"gathered": gathered.detach(), "grad": x.grad, "padded": padded}, sys.argv[4])
    dist.destroy_process_group()
    """
)


def test_all_gather_with_grad_across_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_GATHER_WORKER)
    module_path = Path(losses.__file__)
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(module_path),
                str(tmp_path / "init"),
                str(rank),
                str(tmp_path / f"{rank}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0, output.decode()
    results = [torch.load(tmp_path / f"{rank}") for rank in range(2)]
    expected = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(6.0).view(3, 2) + 10])
    weight_sum = torch.arange(12.0).view(6, 2) * (1 + 2)  # d(loss_0 + loss_1) / d(gathered)
    for rank, result in enumerate(results):
        assert torch.equal(result["gathered"], expected)
        # Backward all-reduces the gathered gradient and keeps this rank's rows.
        assert torch.equal(result["grad"], weight_sum[3 * rank : 3 * rank + 3])
        assert result["padded"].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]


# ---------------------------------------------------------------------------------------------------------------------
# Momentum distillation
# ---------------------------------------------------------------------------------------------------------------------


def momentum_params(model):
    return {n: p for n, p in model.named_parameters() if n.split(".")[0].endswith("_m")}


def test_momentum_copies_start_equal_and_follow_the_ema_formula():
    model = make_model(use_momentum_distillation=True, queue_size=8, momentum=0.9)
    assert set(momentum_params(model)) and not any(p.requires_grad for p in momentum_params(model).values())
    for module, module_m in model._momentum_pairs():
        assert all(torch.equal(p, q) for p, q in zip(module.parameters(), module_m.parameters()))
    with torch.no_grad():  # make the model differ from its momentum copy
        for param in model.qformer.parameters():
            param.add_(0.05 * torch.randn_like(param))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()(**make_batch(batch_size=2))
    for name, param_m in momentum_params(model).items():
        source = name.split(".", 1)
        source = f"{source[0][:-2]}.{source[1]}"
        expected = before[name].clone().mul_(0.9).add_(before[source], alpha=0.1)
        assert torch.equal(param_m, expected), name


def test_queue_pointer_advances_wraps_and_stores_momentum_features():
    model = make_model(use_momentum_distillation=True, queue_size=6, itm_weight=0, itg_weight=0).train()
    pointers = []
    for step in range(4):
        batch = make_batch(batch_size=2, seed=step, image_ids=[10 + step, 20 + step])
        model(**batch)
        pointers.append(int(model.queue_ptr))
        slot = slice(2 * (step % 3), 2 * (step % 3) + 2)
        with torch.no_grad():
            image_feat_m, text_feat_m = model._unimodal_features(
                model.get_vision_features(batch["pixel_values"]), batch["input_ids"], batch["attention_mask"], True
            )
        torch.testing.assert_close(model.text_queue[slot], text_feat_m)
        torch.testing.assert_close(model.image_queue[slot], image_feat_m)
        assert model.image_id_queue[slot].tolist() == [10 + step, 20 + step]
    assert pointers == [2, 4, 0, 2]
    assert int(model.momentum_step) == 4

    frozen_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()(**make_batch(batch_size=2))  # evaluation never updates the queues or the momentum model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen_state.items())
    with pytest.raises(ValueError, match="multiple of the global batch"):
        model.train()(**make_batch(batch_size=4))


def momentum_reference(model, batch, alpha):
    """ITC over [batch; queue] from its definition, the momentum model being an exact copy of the model."""
    with torch.no_grad():
        image_feats = model.get_image_features(batch["pixel_values"])
        text_feats = model.get_text_features(batch["input_ids"], batch["attention_mask"])
    texts = torch.cat([text_feats, model.text_queue])  # (B + K, E)
    images = torch.cat([image_feats, model.image_queue])  # (B + K, Q, E)
    sim_i2t = losses.query_text_similarity(image_feats, texts) / model.temp.detach()
    sim_t2i = losses.query_text_similarity(images, text_feats).t() / model.temp.detach()
    num_columns = texts.shape[0]
    hard = torch.zeros(2, num_columns)
    hard[torch.arange(2), torch.arange(2)] = 1.0
    hard = 0.9 * hard + 0.1 / num_columns
    loss = 0.0
    for sim in (sim_i2t, sim_t2i):
        targets = alpha * sim.softmax(1) + (1 - alpha) * hard  # momentum logits == model logits here
        loss = loss + -(targets * sim.log_softmax(1)).sum(1).mean() / 2
    return loss


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_momentum_itc_against_queue_equals_reference(alpha):
    model = make_model(use_momentum_distillation=True, queue_size=6, alpha=alpha, itm_weight=0, itg_weight=0).eval()
    batch = make_batch(batch_size=2)
    out = model(**batch)
    assert out.logits_per_image.shape == (2, 2)
    torch.testing.assert_close(out.loss_itc.detach(), momentum_reference(model, batch, alpha), atol=1e-5, rtol=1e-5)
    if alpha == 0.0:  # = the hard-target ITC with the queue as extra negatives
        plain = make_model(use_momentum_distillation=True, queue_size=6, alpha=0.4, itm_weight=0, itg_weight=0)
        assert not torch.allclose(plain.eval()(**batch).loss_itc, out.loss_itc)


def test_alpha_warmup_ramps_linearly():
    model = make_model(use_momentum_distillation=True, queue_size=4, alpha=0.4, alpha_warmup_steps=4, itg_weight=0)
    alphas = []
    for _ in range(6):
        alphas.append(model.current_alpha())
        model.train()(**make_batch(batch_size=2))
    assert alphas == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])


def test_momentum_state_is_saved_and_a_plain_checkpoint_seeds_it(tmp_path):
    model = make_model(use_momentum_distillation=True, queue_size=4, itg_weight=0, freeze_vision_tower=False)
    assert hasattr(model, "vision_tower_m")  # a trained tower gets a momentum copy too
    model.train()(**make_batch(batch_size=2))
    model.save_pretrained(tmp_path / "md")
    loaded = AutoModel.from_pretrained(tmp_path / "md")
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert {"image_queue", "text_queue", "queue_ptr", "momentum_step"} <= original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)

    make_model().save_pretrained(tmp_path / "plain")
    seeded = QFormerForImageTextPretraining.from_pretrained(
        tmp_path / "plain", use_momentum_distillation=True, queue_size=4
    )
    for module, module_m in seeded._momentum_pairs():
        assert all(torch.equal(p, q) for p, q in zip(module.parameters(), module_m.parameters()))
    torch.testing.assert_close(seeded.text_queue.norm(dim=-1), torch.ones(4))


# ---------------------------------------------------------------------------------------------------------------------
# BERT initialisation
# ---------------------------------------------------------------------------------------------------------------------


def tiny_bert(model_class=BertModel):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    bert = model_class(config).eval()
    with torch.no_grad():
        for param in bert.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return bert


@pytest.mark.parametrize("padded", [False, True])
def test_qformer_from_bert_matches_bert_on_text(tmp_path, padded):
    bert = tiny_bert()
    bert.save_pretrained(tmp_path)
    qformer = qformer_from_bert(tmp_path, num_query_tokens=4, encoder_hidden_size=16, cross_attention_frequency=2)
    qformer.eval()
    assert [layer.has_cross_attention for layer in qformer.encoder.layer] == [True, False, True]
    ids = torch.randint(5, 60, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, -3:] = 0
        mask[2, -1:] = 0
    expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    actual = qformer(input_ids=ids, attention_mask=mask, use_queries=False).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    layer = qformer.encoder.layer[0]
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert torch.equal(layer.output_query.LayerNorm.bias, layer.output.LayerNorm.bias)
    assert layer.intermediate_query.dense.weight.data_ptr() != layer.intermediate.dense.weight.data_ptr()


def test_pretraining_model_from_bert_with_mlm_head_and_dec_token(tmp_path):
    bert = tiny_bert(BertForMaskedLM)
    bert.save_pretrained(tmp_path)
    model = pretraining_model_from_bert(
        tmp_path,
        vision_config=vision_config(),
        num_query_tokens=4,
        qformer_overrides={"vocab_size": 61},
        embed_dim=16,
        decoder_start_token_id=60,
        eos_token_id=3,
        pad_token_id=0,
    ).eval()
    embeddings = model.qformer.embeddings.word_embeddings.weight
    assert embeddings.shape == (61, 32) and model.lm_head.decoder.weight is embeddings
    torch.testing.assert_close(embeddings[:60], bert.bert.embeddings.word_embeddings.weight)
    ids = torch.randint(5, 60, (2, 6))
    hidden = model.qformer(input_ids=ids, use_queries=False).last_hidden_state
    # BERT's MLM head becomes the ITG head: same logits over BERT's vocabulary.
    torch.testing.assert_close(model.lm_head(hidden)[..., :60], bert(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    out = model(**make_batch())  # trains end to end with the added [DEC] id
    assert torch.isfinite(out.loss)


def test_add_decoder_start_token():
    from tiny import make_tokenizer

    tokenizer = make_tokenizer()
    size = len(tokenizer)
    dec_id = add_decoder_start_token(tokenizer)
    assert dec_id == size and len(tokenizer) == size + 1 and tokenizer.bos_token == "[DEC]"


def test_bert_shape_overrides_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="shape of BERT's weights"):
        qformer_from_bert(tiny_bert(), num_query_tokens=4, encoder_hidden_size=16, hidden_size=64)


# ---------------------------------------------------------------------------------------------------------------------
# Stage-1 -> stage-2 hand-off
# ---------------------------------------------------------------------------------------------------------------------


def stage2_vlm(use_text_input: bool = False, **bridge_overrides) -> BridgeVLMForConditionalGeneration:
    config = BridgeVLMConfig(
        vision_config=vision_config(hidden_size=VISION_WIDTH),
        bridge_config=bridge_config("qformer", use_text_input=use_text_input, **bridge_overrides),
        text_config=text_config("opt"),
        image_token_id=IMAGE_ID,
        use_qformer_text_input=use_text_input,
    )
    return BridgeVLMForConditionalGeneration(config).eval()


def test_stage1_qformer_drops_into_the_vlm(tmp_path):
    stage1 = make_model().eval()
    pixel_values = make_batch()["pixel_values"]
    image_embeds = stage1.get_vision_features(pixel_values)
    expected = stage1.qformer(image_embeds=image_embeds).image_tokens

    vlm = load_qformer_into_vlm(stage2_vlm(), stage1, include_vision_tower=True)
    assert not hasattr(vlm.model.bridge.embeddings, "word_embeddings")  # BLIP-2 stage 2 has no text branch
    assert torch.equal(vlm.model.bridge(image_embeds=image_embeds).image_tokens, expected)
    assert torch.equal(vlm.model.bridge(image_embeds=vlm.model._vision_features(pixel_values)).image_tokens, expected)

    stage1.qformer.save_pretrained(tmp_path / "qformer")  # the documented save / load route
    reloaded = QFormerModel.from_pretrained(tmp_path / "qformer").eval()
    assert torch.equal(reloaded(image_embeds=image_embeds).image_tokens, expected)
    from_dir = load_qformer_into_vlm(stage2_vlm(), str(tmp_path / "qformer"))
    assert torch.equal(from_dir.model.bridge(image_embeds=image_embeds).image_tokens, expected)

    instruct = load_qformer_into_vlm(stage2_vlm(use_text_input=True), stage1)  # InstructBLIP keeps the text branch
    ids = make_batch()["input_ids"]
    torch.testing.assert_close(
        instruct.model.bridge(image_embeds=image_embeds, input_ids=ids).image_tokens,
        stage1.qformer(image_embeds=image_embeds, input_ids=ids).image_tokens,
    )


def test_vlm_hand_off_rejects_mismatches():
    stage1 = make_model()
    with pytest.raises(ValueError, match="num_query_tokens"):
        load_qformer_into_vlm(stage2_vlm(num_query_tokens=8), stage1)
    vlm = stage2_vlm()
    vlm.config.vision_feature_layer = -2
    with pytest.raises(ValueError, match="vision layer"):
        load_qformer_into_vlm(vlm, stage1)
    with pytest.raises(ValueError, match="whole stage-1 model"):
        load_qformer_into_vlm(stage2_vlm(), stage1.qformer, include_vision_tower=True)


# ---------------------------------------------------------------------------------------------------------------------
# Docstring examples (the repo's test_docstrings.py lists the other modules)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "vlbridge.configuration.configuration_qformer_pretraining",
        "vlbridge.modeling.modeling_qformer_pretraining",
        "vlbridge.conversion.bert",
    ],
)
def test_docstring_examples(name):
    run_docstring_examples(name)
