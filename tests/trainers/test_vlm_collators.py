"""CaptionCollator and ChatCollator: exact labels for decoder-only and encoder-decoder models, InstructBLIP text,
truncation errors, and a short training run in which the loss falls."""

import re

import pytest
import torch
from helpers import (
    NUM_IMAGE_TOKENS,
    chat_rows,
    decode,
    make_chat_tokenizer,
    make_model,
    make_processor,
    spans,
    text_of,
)
from tiny import BOS_ID, IMAGE_ID
from transformers import Trainer, TrainingArguments

from vlbridge.data import make_synthetic_chat, make_synthetic_image_text
from vlbridge.processing import BridgeProcessor
from vlbridge.trainers import CaptionCollator, ChatCollator


PROMPT = "a photo of"
N = NUM_IMAGE_TOKENS  # image tokens per image of the tiny Q-Former (num_query_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Builders (the tiny chat VLM, its processor and tokenizers: tests/helpers.py)
# ---------------------------------------------------------------------------------------------------------------------


def caption_rows(n: int = 4) -> list[dict]:
    data = make_synthetic_image_text({"train": n}, image_size=32, captions_per_image=1)["train"]
    return [data[i] for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Label helpers
# ---------------------------------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Tokens of the word-level tokenizer, as `decode` joins them back."""
    return re.findall(r"\w+|[^\w\s]+", text)


def check_padding(batch, pad_id: int):
    """Right padding: pads only after the last real token, never in the loss."""
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        length = int(mask.sum())
        assert mask.tolist() == [1] * length + [0] * (len(mask) - length)
        assert ids[length:].tolist() == [pad_id] * (len(ids) - length)
        assert (labels[length:] == -100).all()


# ---------------------------------------------------------------------------------------------------------------------
# CaptionCollator
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,text", [("llama", "llama"), ("opt", "opt"), ("pad_is_eos", "llama")])
def test_caption_decoder_only_labels_are_exactly_caption_and_eos(single_thread, kind, text):
    processor = make_processor(kind)
    tokenizer = processor.tokenizer
    rows = caption_rows(4)
    batch = CaptionCollator(processor, prompt=PROMPT)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert len({len(words(row["caption"])) for row in rows}) > 1  # captions of different lengths get padded
    check_padding(batch, tokenizer.pad_token_id)
    for ids, labels, mask, row in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], rows):
        [(start, end)] = spans(labels.tolist())  # one span: the caption and its EOS
        length = int(mask.sum())
        assert decode(tokenizer, labels[start:end]) == " ".join(words(row["caption"]) + ["</s>"])
        assert torch.equal(labels[start:end], ids[start:end]) and end == length  # the final EOS is trained
        # Everything before the caption is BOS, the image run and the prompt, without loss.
        assert (
            ids[:start].tolist()
            == [tokenizer.bos_token_id] + [IMAGE_ID] * N + tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        )
        assert IMAGE_ID not in labels.tolist()
    out = make_model(text)(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape


def test_caption_without_prompt_and_from_model(single_thread):
    processor = make_processor()
    collator = CaptionCollator.from_model(make_model("opt"), processor)
    assert collator.is_encoder_decoder is False
    rows = caption_rows(2)
    batch = collator(rows)
    for ids, labels, row in zip(batch["input_ids"], batch["labels"], rows):
        [(start, end)] = spans(labels.tolist())
        assert start == 1 + N and ids[:start].tolist() == [BOS_ID] + [IMAGE_ID] * N
        assert decode(processor.tokenizer, labels[start:end]) == " ".join(words(row["caption"]) + ["</s>"])
    mismatched = BridgeProcessor(processor.image_processor, make_chat_tokenizer(), num_image_tokens=N + 1)
    with pytest.raises(ValueError, match="num_image_tokens=config.num_image_tokens"):
        CaptionCollator.from_model(make_model("opt"), mismatched)


def test_caption_encoder_decoder_targets_the_caption(single_thread):
    processor = make_processor()
    model = make_model("t5")
    collator = CaptionCollator.from_model(model, processor, prompt=PROMPT)
    assert collator.is_encoder_decoder
    rows = caption_rows(4)
    batch = collator(rows)
    prompt_ids = processor.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    for ids, mask, labels, row in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], rows):
        assert ids[: int(mask.sum())].tolist() == [BOS_ID] + [IMAGE_ID] * N + prompt_ids  # no caption in the encoder
        [(start, end)] = spans(labels.tolist())
        assert start == 0 and (labels[end:] == -100).all()
        assert decode(processor.tokenizer, labels[:end]) == " ".join(words(row["caption"]) + ["</s>"])
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["labels"].shape


def test_caption_prefix_lm_moves_a_random_prefix_to_the_encoder():
    processor = make_processor()
    rows = caption_rows(16)
    batch = CaptionCollator(processor, is_encoder_decoder=True, prompt=PROMPT, prefix_lm=True, seed=0)(rows)
    again = CaptionCollator(processor, is_encoder_decoder=True, prompt=PROMPT, prefix_lm=True, seed=0)(rows)
    assert torch.equal(batch["input_ids"], again["input_ids"])  # seeded
    prefix_lengths = []
    for ids, mask, labels, row in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], rows):
        encoder_words = processor.tokenizer.convert_ids_to_tokens(ids[1 + N : int(mask.sum())])
        [(start, end)] = spans(labels.tolist())
        target_words = processor.tokenizer.convert_ids_to_tokens(labels[start:end])
        assert target_words[-1] == "</s>" and len(target_words) >= 2  # at least one word to write, then EOS
        prefix = encoder_words[len(words(PROMPT)) :]
        assert encoder_words[: len(words(PROMPT))] == words(PROMPT)
        assert prefix + target_words[:-1] == words(row["caption"])  # the split loses and duplicates nothing
        prefix_lengths.append(len(prefix))
    assert 0 in prefix_lengths and max(prefix_lengths) > 0
    with pytest.raises(ValueError, match="encoder-decoder"):
        CaptionCollator(processor, prefix_lm=True)


def test_caption_rejects_rows_it_cannot_use():
    collator = CaptionCollator(make_processor())
    row = caption_rows(1)[0]
    with pytest.raises(ValueError, match="exactly one image per caption"):
        collator([{**row, "image": [row["image"], row["image"]]}])
    with pytest.raises(ValueError, match="no caption"):
        collator([{**row, "caption": "  "}])
    assert collator([{**row, "image": [row["image"]]}])["pixel_values"].shape[0] == 1  # a one-image list is fine


def test_caption_truncation_cuts_caption_or_raises():
    processor = make_processor()
    row = {"image": caption_rows(1)[0]["image"], "caption": "two small red circles and a large blue square"}
    prefix = 1 + N + len(words(PROMPT))  # BOS, image run, prompt
    collator = CaptionCollator(processor, prompt=PROMPT, max_length=prefix + 3)
    batch = collator([row])
    assert batch["input_ids"].shape == (1, prefix + 3) and collator.num_truncated == 1
    # A cut caption loses its EOS: the model must not learn to stop mid-sentence.
    assert decode(processor.tokenizer, batch["labels"][0, prefix:]) == "two small red"
    with pytest.raises(ValueError, match=rf"every token that carries loss.*max_length>={prefix + 1}"):
        CaptionCollator(processor, prompt=PROMPT, max_length=prefix)([row])
    with pytest.raises(ValueError, match=rf"cut its image tokens.*max_length>={prefix + 1}"):
        CaptionCollator(processor, prompt=PROMPT, max_length=N)([row])


# ---------------------------------------------------------------------------------------------------------------------
# ChatCollator
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,text", [("llama", "llama"), ("opt", "opt")])
def test_chat_labels_are_exactly_every_assistant_answer(single_thread, kind, text):
    processor = make_processor(kind)
    tokenizer = processor.tokenizer
    rows = chat_rows(6, turns=(1, 3), system_prompt=True)
    assert max(len(row["messages"]) for row in rows) >= 5  # some conversations are multi-turn
    batch = ChatCollator(processor)(rows)
    check_padding(batch, tokenizer.pad_token_id)
    assistant_header = tokenizer("assistant: ", add_special_tokens=False)["input_ids"]
    for ids, labels, row in zip(batch["input_ids"], batch["labels"], rows):
        answers = [text_of(m) for m in row["messages"] if m["role"] == "assistant"]
        runs = spans(labels.tolist())
        assert len(runs) == len(answers)  # every turn carries loss
        for (start, end), answer in zip(runs, answers):
            assert decode(tokenizer, labels[start:end]) == " ".join(words(answer) + ["</s>"])
            assert torch.equal(labels[start:end], ids[start:end])
            assert ids[start - len(assistant_header) : start].tolist() == assistant_header  # header: no loss
        # Nothing else is in the loss: not the system prompt, the questions, the image or the padding.
        in_spans = {j for start, end in runs for j in range(start, end)}
        assert all(labels[j] == -100 for j in range(len(labels)) if j not in in_spans)
        assert list(ids).count(IMAGE_ID) == N and IMAGE_ID not in labels.tolist()
        assert ids[0] == tokenizer.bos_token_id and labels[0] == -100
    out = make_model(text)(**batch)
    assert torch.isfinite(out.loss)


def test_chat_encoder_decoder_targets_the_last_answer(single_thread):
    processor = make_processor()
    tokenizer = processor.tokenizer
    model = make_model("t5")
    rows = chat_rows(6, turns=(1, 3))
    batch = ChatCollator.from_model(model, processor)(rows)
    for ids, mask, labels, row in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], rows):
        answers = [text_of(m) for m in row["messages"] if m["role"] == "assistant"]
        [(start, end)] = spans(labels.tolist())
        assert start == 0 and decode(tokenizer, labels[:end]) == " ".join(words(answers[-1]) + ["</s>"])
        encoder = decode(tokenizer, ids[: int(mask.sum())])
        assert encoder.endswith("assistant :") and list(ids).count(IMAGE_ID) == N
        for answer in answers[:-1]:  # earlier answers are context for the encoder
            assert " ".join(words(answer)) + " </s>" in encoder
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["labels"].shape
    unanswered = {**rows[0], "messages": rows[0]["messages"][:-1]}
    with pytest.raises(ValueError, match="must end with one"):
        ChatCollator(processor, is_encoder_decoder=True)([unanswered])


def test_instructblip_qformer_text_is_the_instruction(single_thread):
    processor = make_processor(qformer=True)
    qformer_tokenizer = processor.qformer_tokenizer
    rows = chat_rows(6, turns=(2, 3), system_prompt=True)
    batch = ChatCollator(processor)(rows)
    # The user message that holds the image: never the answers, the system prompt or later questions.
    instructions = [text_of(row["messages"][1]) for row in rows]
    expected = qformer_tokenizer(instructions, padding=True, return_tensors="pt")
    assert torch.equal(batch["qformer_input_ids"], expected["input_ids"])
    assert torch.equal(batch["qformer_attention_mask"], expected["attention_mask"])
    model = make_model("opt", use_qformer_text_input=True)
    assert torch.isfinite(model(**batch).loss)

    captions = CaptionCollator(processor, prompt=PROMPT)(caption_rows(2))
    assert captions["qformer_input_ids"].tolist() == [qformer_tokenizer(PROMPT)["input_ids"]] * 2
    assert torch.isfinite(model(**captions).loss)


def test_processor_chat_template_gives_the_qformer_the_instruction_not_the_answers(single_thread):
    """TRL's SFTTrainer tokenizes through `apply_chat_template`: the Q-Former must not see the answers there either."""
    processor = make_processor(qformer=True)
    rows = chat_rows(4, turns=(2, 3))
    out = processor.apply_chat_template(
        [row["messages"] for row in rows],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"images": [row["images"] for row in rows], "padding": True},
    )
    expected = processor.qformer_tokenizer([text_of(row["messages"][0]) for row in rows], padding=True)
    assert out["qformer_input_ids"].tolist() == expected["input_ids"]  # the first question alone, per image
    assert torch.equal(ChatCollator(processor)(rows)["qformer_input_ids"], out["qformer_input_ids"])


def test_chat_several_images_and_text_only_rows(single_thread):
    processor = make_processor()
    image = chat_rows(1)[0]["images"][0]
    two_images = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "left"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "two circles"}]},
        ],
        "images": [image, image],
    }
    text_only = {"messages": [{"role": "user", "content": "yes?"}, {"role": "assistant", "content": "no"}]}
    batch = ChatCollator(processor)([two_images, text_only])
    assert batch["pixel_values"].shape[0] == 2
    assert [list(row).count(IMAGE_ID) for row in batch["input_ids"]] == [2 * N, 0]
    decoded = [
        decode(processor.tokenizer, labels[start:end]) for labels in batch["labels"] for start, end in spans(labels)
    ]
    assert decoded == ["two circles </s>", "no </s>"]
    assert torch.isfinite(make_model("llama")(**batch).loss)
    with pytest.raises(ValueError, match="placeholder"):  # the processor's count check surfaces
        ChatCollator(processor)([{**two_images, "images": [image]}])


def test_chat_truncation_errors_and_counting():
    processor = make_processor()
    row = chat_rows(1, turns=2, system_prompt=True)[0]
    full = ChatCollator(processor)([row])
    length = int(full["attention_mask"].sum())
    (first_start, first_end), (second_start, _) = spans(full["labels"][0].tolist())
    image_end = max(j for j, t in enumerate(full["input_ids"][0].tolist()) if t == IMAGE_ID) + 1

    collator = ChatCollator(processor, max_length=second_start + 1)  # the second answer loses all but a token
    batch = collator([row])
    assert batch["input_ids"].shape[1] == second_start + 1 and collator.num_truncated == 1
    assert torch.equal(batch["labels"][0, :first_end], full["labels"][0, :first_end])
    assert ChatCollator(processor, max_length=length)([row])["input_ids"].shape[1] == length  # no cut, no count

    with pytest.raises(ValueError, match=rf"every token that carries loss.*max_length>={first_start + 1}"):
        ChatCollator(processor, max_length=first_start)([row])
    with pytest.raises(ValueError, match=rf"cut its image tokens.*max_length>={first_start + 1}"):
        ChatCollator(processor, max_length=image_end - 1)([row])


def test_chat_rejects_samples_without_loss():
    processor = make_processor()
    row = chat_rows(1)[0]
    with pytest.raises(ValueError, match="no assistant message"):
        ChatCollator(processor)([{**row, "messages": row["messages"][:1]}])
    no_generation = processor.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    with pytest.raises(ValueError, match="generation"):
        ChatCollator(processor, chat_template=no_generation)([row])


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,text", [("chat", "llama"), ("caption", "t5")])
def test_trainer_loss_falls(single_thread, tmp_path, task, text):
    processor = make_processor()
    model = make_model(text)
    if task == "chat":
        dataset = make_synthetic_chat({"train": 16}, image_size=32, turns=(1, 2))["train"]
        collator = ChatCollator.from_model(model, processor)
    else:
        dataset = make_synthetic_image_text({"train": 16}, image_size=32, captions_per_image=1)["train"]
        collator = CaptionCollator.from_model(model, processor, prompt=PROMPT)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=3e-3,  # the tiny LM (hidden 32) needs more than 1e-3 to fall far in 40 steps
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the collator reads the raw image and text columns
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses
