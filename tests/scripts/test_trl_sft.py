"""TRL's SFTTrainer with a vlbridge model and BridgeProcessor: assistant-only labels, InstructBLIP text, learning.

What TRL needs (documented in the README): `processing_class=BridgeProcessor`, a dataset with `messages` and
`images` columns (`vlbridge.data.make_synthetic_chat` gives them), `SFTConfig(assistant_only_loss=True)` (the
processor's chat template marks assistant turns with `{% generation %}`), and `max_length=None` or a length that
never cuts an image's tokens.
"""

import pytest
import torch
from datasets import Dataset
from helpers import chat_rows, decode, make_model, make_processor, spans, text_of
from tiny import IMAGE_ID, sft_config


trl = pytest.importorskip("trl")

pytestmark = pytest.mark.usefixtures("single_thread")


def make_trainer(tmp_path, processor, model, rows, **kwargs):
    dataset = Dataset.from_list([{"messages": row["messages"], "images": row["images"]} for row in rows])
    args = sft_config(tmp_path, logging_steps=1, seed=0, **kwargs)
    return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor), dataset


def test_sft_trainer_labels_only_the_assistant_answers(tmp_path):
    processor = make_processor()
    rows = chat_rows(4, turns=(2, 3), system_prompt=True)
    trainer, dataset = make_trainer(tmp_path, processor, make_model("llama"), rows, max_steps=1)
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    eos = processor.tokenizer.eos_token
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"]):
        answers = [text_of(m) for m in row["messages"] if m["role"] == "assistant"]
        assert [decode(processor.tokenizer, labels[start:end]) for start, end in spans(labels)] == [
            f"{answer} {eos}" for answer in answers
        ]
        trained = labels != -100
        assert not (ids[trained] == IMAGE_ID).any()
        assert torch.equal(labels[trained], ids[trained])  # labels are the tokens themselves, never shifted ids
    assert (batch["input_ids"] == IMAGE_ID).any(), "the image tokens must be in the input"


def test_sft_trainer_instructblip_qformer_text_is_the_instruction(tmp_path):
    processor = make_processor(qformer=True)
    rows = chat_rows(4, turns=(2, 3))
    model = make_model("opt", use_qformer_text_input=True)
    trainer, dataset = make_trainer(tmp_path, processor, model, rows, max_steps=1)
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    expected = processor.qformer_tokenizer([text_of(row["messages"][0]) for row in rows], padding=True)
    assert batch["qformer_input_ids"].tolist() == expected["input_ids"]
    trainer.train()


def test_sft_trainer_learns(tmp_path):
    """60 steps on 16 one-turn chats: the loss on the answers falls to well under two thirds (measured: 0.34x)."""
    processor = make_processor()
    trainer, _ = make_trainer(
        tmp_path,
        processor,
        make_model("llama"),
        chat_rows(16, turns=1),
        max_steps=60,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-5:]) / 5 < 0.65 * sum(losses[:5]) / 5, losses[::5]
