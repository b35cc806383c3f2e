"""Stage-1 trainer: sub-losses logged in training and evaluation; accumulation equals the larger batch."""

import pytest
import torch
from tiny import vision_config
from transformers import CLIPImageProcessor

from vlbridge import QFormerForImageTextPretraining, QFormerPretrainingConfig
from vlbridge.data import build_word_tokenizer, caption_vocabulary, group_captions, make_synthetic_image_text
from vlbridge.evaluation import evaluate_stage1
from vlbridge.trainers import ImageTextCollator, Stage1Config, Stage1Trainer


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data():
    splits = make_synthetic_image_text({"train": 16, "validation": 4, "test": 2}, image_size=32, captions_per_image=2)
    tokenizer = build_word_tokenizer([*caption_vocabulary(), "[DEC]"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return splits, tokenizer, ImageTextCollator(image_processor, tokenizer, max_length=24)


def make_model(tokenizer, dropout: float = 0.0, seed: int = 0) -> QFormerForImageTextPretraining:
    torch.manual_seed(seed)
    config = QFormerPretrainingConfig(
        vision_config=vision_config(),
        qformer_config={
            "model_type": "vlbridge_qformer",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "num_query_tokens": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32,
            "hidden_dropout_prob": dropout,
            "attention_probs_dropout_prob": dropout,
        },
        embed_dim=16,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return QFormerForImageTextPretraining(config)


def run(tmp_path, data, batch_size, accumulation, steps=1, **kwargs):
    splits, tokenizer, collator = data
    model = make_model(tokenizer)
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
        **kwargs,
    )
    trainer = Stage1Trainer(model=model, args=args, train_dataset=splits["train"], data_collator=collator)
    # Sequential batches so both runs see the same 8 captions in the first optimizer step.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(splits["train"])
    trainer.train()
    return model, trainer


def test_gradient_accumulation_equals_larger_batch(tmp_path, data):
    big, big_trainer = run(tmp_path / "big", data, batch_size=8, accumulation=1)
    acc, acc_trainer = run(tmp_path / "acc", data, batch_size=4, accumulation=2)
    big_log = next(entry for entry in big_trainer.state.log_history if "loss" in entry)
    acc_log = next(entry for entry in acc_trainer.state.log_history if "loss" in entry)
    assert acc_log["loss"] == pytest.approx(big_log["loss"], rel=1e-5)
    assert acc_log["loss_itc"] == pytest.approx(big_log["loss_itc"], rel=1e-5)
    # SGD without momentum: equal parameters after the step mean equal gradients.
    for (name, a), (_, b) in zip(big.named_parameters(), acc.named_parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)
    moved = [n for n, p in big.named_parameters() if p.requires_grad]
    assert moved, "nothing trained"


def test_plain_accumulation_would_differ(tmp_path, data):
    """The window is what makes accumulation exact: per-micro-batch ITC over 4 captions is another loss."""
    splits, tokenizer, collator = data
    model = make_model(tokenizer)
    batch = collator([splits["train"][i] for i in range(8)])
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    full = model(**batch, sampling_seed=0).loss_itc
    plain = sum(model(**half, sampling_seed=0).loss_itc for half in halves) / 2
    assert not torch.allclose(full, plain)


def test_sub_losses_logged_in_training_and_evaluation(tmp_path, data):
    splits, tokenizer, collator = data
    model, trainer = run(tmp_path, data, batch_size=4, accumulation=1, steps=3)
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("loss_itc", "loss_itm", "loss_itg", "itm_accuracy", "temperature"):
        assert all(key in entry for entry in train_logs), key
    metrics = trainer.evaluate(splits["validation"])
    for key in ("eval_loss", "eval_loss_itc", "eval_loss_itm", "eval_loss_itg"):
        assert key in metrics, key
    total = metrics["eval_loss_itc"] + metrics["eval_loss_itm"] + metrics["eval_loss_itg"]
    assert metrics["eval_loss"] == pytest.approx(total, rel=1e-4)


def test_itm_negatives_ramp_from_random_to_hard(tmp_path, data):
    """`itm_hard_negative_warmup_ratio` ramps the hardness the model receives linearly from 0 to 1, and logs it."""
    splits, tokenizer, collator = data
    seen = []
    model, trainer = run(tmp_path, data, batch_size=4, accumulation=1, steps=4, itm_hard_negative_warmup_ratio=0.5)
    assert [entry["itm_negative_hardness"] for entry in trainer.state.log_history if "loss" in entry] == [
        0.0,
        0.5,
        1.0,
        1.0,
    ]
    original = model.forward
    model.forward = lambda *args, **kwargs: (
        seen.append(kwargs.get("itm_negative_hardness")) or original(*args, **kwargs)
    )
    trainer.evaluate(splits["validation"])
    assert seen and all(value is None for value in seen), "evaluation must keep LAVIS' hard negatives"
    with pytest.raises(ValueError, match="itm_hard_negative_warmup_ratio"):
        Stage1Config(str(tmp_path), itm_hard_negative_warmup_ratio=1.5)


def test_retrieval_caption_is_written_from_the_scene(data):
    """Built-in data is retrieved with its unique "positions" caption even when it was not among its captions."""
    from vlbridge.evaluation.stage1 import retrieval_caption

    splits, _, _ = data
    rows = group_captions(splits["train"])
    captions = [retrieval_caption(row) for row in rows]
    assert len(set(captions)) == len(captions)
    assert all(
        caption.split()[-1] in {"left", "right", "top", "bottom", "centre", "row", "column"} for caption in captions
    )
    assert retrieval_caption({"captions": ["a b"], "objects": None}) == "a b"
    with pytest.raises(ValueError, match="Unknown caption style"):
        retrieval_caption(rows[0], "poem")


def test_collator_appends_eos_and_masks_padding(data):
    splits, tokenizer, collator = data
    batch = collator([splits["train"][i] for i in range(3)])
    lengths = batch["attention_mask"].sum(1)
    for row, length in enumerate(lengths):
        assert batch["input_ids"][row, 0] == tokenizer.bos_token_id
        assert batch["input_ids"][row, length - 1] == tokenizer.eos_token_id
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
    assert batch["image_ids"].tolist() == [splits["train"][i]["image_id"] for i in range(3)]


def test_collator_gives_one_eos_when_the_tokenizer_adds_it(data, monkeypatch):
    # BERT-style tokenizers (a converted BLIP-2 retrieval checkpoint) end every text with [SEP] = EOS already.
    _, tokenizer, collator = data
    eos = tokenizer.eos_token_id
    plain = collator.tokenize(["a red circle"])["input_ids"][0].tolist()
    call = type(tokenizer).__call__

    def with_eos(self, text, **kwargs):
        encoding = call(self, text, **kwargs)
        encoding["input_ids"] = encoding["input_ids"] + [eos]
        return encoding

    monkeypatch.setattr(type(tokenizer), "__call__", with_eos)
    doubled = collator.tokenize(["a red circle"])["input_ids"][0].tolist()
    assert doubled == plain and plain[-1] == eos and plain.count(eos) == 1


def test_short_run_learns_retrieval_and_captions():
    """From scratch, 100 steps on 32 single-object images: ITC falls and train retrieval is far above chance (1/32).

    BERT's init (std 0.02) leaves a tiny from-scratch Q-Former's [CLS] and query outputs almost equal for every
    input, and ITC sits on its ln(N) plateau; a larger init (0.3) lets it learn within a few steps. The full held-out
    learning figures come from examples/stage1.py.
    """
    torch.manual_seed(0)
    splits = make_synthetic_image_text({"train": 32}, image_size=32, captions_per_image=1, max_objects=1)
    tokenizer = build_word_tokenizer([*caption_vocabulary(), "[DEC]"])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    collator = ImageTextCollator(image_processor, tokenizer, max_length=16)
    batch = collator([splits["train"][i] for i in range(32)])
    config = QFormerPretrainingConfig(
        vision_config={
            "model_type": "vit",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 32,
            "patch_size": 8,
        },
        qformer_config={
            "model_type": "vlbridge_qformer",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "num_query_tokens": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32,
            "initializer_range": 0.3,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        embed_dim=32,
        freeze_vision_tower=False,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = QFormerForImageTextPretraining(config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    history = []
    for step in range(100):
        out = model(**batch, sampling_seed=step)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((out.loss_itc.item(), out.loss_itg.item()))
    (itc_start, itg_start), (itc_end, itg_end) = history[0], history[-1]
    assert itc_end < 0.5 * itc_start and itg_end < 0.5 * itg_start, history[::20]
    # Retrieved with the caption it trained on (the "full" one); held-out learning is examples/stage1.py's.
    rows = group_captions(splits["train"])
    metrics = evaluate_stage1(model, rows, collator, retrieval_style=None, k_test=8, progress=False)
    assert metrics["i2t_r1"] >= 0.5 and metrics["t2i_r1"] >= 0.5, metrics  # chance: 0.03
