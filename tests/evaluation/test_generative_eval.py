"""`evaluate_generation`: batched left-padded answers equal one-by-one greedy ones, metrics match the metric functions
on oracle outputs and drop on wrong ones, per-type VQA accuracy, and clear errors on bad input."""

import pytest
import torch
from helpers import make_model, make_processor

from vlbridge.data import group_captions, make_synthetic_image_text, make_synthetic_vqa
from vlbridge.evaluation import evaluate_generation
from vlbridge.metrics.caption_metrics import bleu, cider_d


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def vqa_data():
    return make_synthetic_vqa({"test": 2}, image_size=32, questions_per_image=3)["test"]


@pytest.fixture(scope="module")
def caption_pairs():
    """One row per (image, caption): three images with two captions each."""
    return make_synthetic_image_text({"test": 3}, image_size=32, captions_per_image=2)["test"]


class Oracle(torch.nn.Module):
    """Stands in for a model: "generates" the given texts in order, after checking the batch is left-padded."""

    def __init__(self, tokenizer, texts, is_encoder_decoder: bool = False):
        super().__init__()
        self.tokenizer, self.texts = tokenizer, list(texts)
        self.config = type("Config", (), {"is_encoder_decoder": is_encoder_decoder})()
        self.calls = []

    def generate(self, input_ids, attention_mask, pixel_values, **kwargs):
        self.calls.append(kwargs)
        assert attention_mask[:, -1].all(), "every prompt must end at the last position (left padding)"
        batch, self.texts = self.texts[: len(input_ids)], self.texts[len(input_ids) :]
        new = self.tokenizer(batch, padding=True, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return new if self.config.is_encoder_decoder else torch.cat([input_ids, new], dim=1)


def greedy(processor, model, image, text: str, max_new_tokens: int) -> str:
    """The reference: one row at a time, no padding at all."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image.convert("RGB")], text=prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    if not model.config.is_encoder_decoder:
        ids = ids[:, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(ids[0], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------------------------------
# Real generation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["llama", "t5"])
def test_batched_answers_equal_one_by_one_greedy(processor, vqa_data, text):
    model = make_model(text).train()
    questions = list(vqa_data["question"])
    assert len({len(question.split()) for question in questions}) > 1  # prompts of different lengths get padded
    result = evaluate_generation(
        model, processor, vqa_data, task="vqa", batch_size=4, max_new_tokens=5, progress=False
    )
    assert model.training  # put back as it was
    model.eval()
    expected = [greedy(processor, model, vqa_data[i]["image"], questions[i], 5) for i in range(len(questions))]
    assert result["predictions"] == expected
    assert text == "t5" or any(expected)  # the random decoder-only model does write something


def test_caption_prompt_and_generation(processor, caption_pairs):
    model = make_model("llama").eval()
    images = group_captions(caption_pairs)
    result = evaluate_generation(
        model, processor, images, batch_size=2, max_new_tokens=4, prompt="describe the image.", progress=False
    )
    expected = [greedy(processor, model, images[i]["image"], "describe the image.", 4) for i in range(images.num_rows)]
    assert result["predictions"] == expected
    assert set(result) >= {"cider", "bleu1", "bleu2", "bleu3", "bleu4", "samples", "num_examples"}


def test_plain_layout_is_the_stage2_collators(processor, caption_pairs):
    """`use_chat_template=False` continues `<image> prompt` exactly as CaptionCollator lays stage-2 text out."""
    model = make_model("llama").eval()
    images = group_captions(caption_pairs)
    result = evaluate_generation(model, processor, images, max_new_tokens=4, use_chat_template=False, progress=False)
    expected = []
    for i in range(images.num_rows):
        inputs = processor(images=[images[i]["image"]], text=processor.image_token, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        new = ids[0, inputs["input_ids"].shape[1] :]
        expected.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    assert result["predictions"] == expected


# ---------------------------------------------------------------------------------------------------------------------
# Metrics on oracle outputs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_encoder_decoder", [False, True])
def test_caption_metrics_of_oracle_and_wrong_captions(processor, caption_pairs, is_encoder_decoder):
    references = [list(captions) for captions in group_captions(caption_pairs)["captions"]]
    assert len(references) == 3 and all(len(refs) == 2 for refs in references)  # grouped by `image_id`
    firsts = [refs[0] for refs in references]
    oracle = Oracle(processor.tokenizer, firsts, is_encoder_decoder)
    result = evaluate_generation(oracle, processor, caption_pairs, batch_size=2, max_new_tokens=7, progress=False)
    assert result["predictions"] == firsts
    assert result["cider"] == pytest.approx(cider_d(firsts, references))
    assert {k: result[k] for k in ("bleu1", "bleu4")} == pytest.approx({"bleu1": 1.0, "bleu4": 1.0})
    assert result["samples"][0] == {"references": references[0], "prediction": firsts[0]}
    assert oracle.calls[0]["max_new_tokens"] == 7 and oracle.calls[0]["do_sample"] is False

    shuffled = firsts[1:] + firsts[:1]  # every image gets another image's caption
    wrong = evaluate_generation(Oracle(processor.tokenizer, shuffled), processor, caption_pairs, progress=False)
    assert wrong["cider"] == pytest.approx(cider_d(shuffled, references))
    assert wrong["cider"] < result["cider"] and wrong["bleu4"] < result["bleu4"]
    assert wrong["bleu1"] == pytest.approx(bleu(shuffled, references)["bleu1"])


def test_single_caption_column_without_image_id_is_one_reference_per_row(processor, caption_pairs):
    rows = caption_pairs.remove_columns("image_id")
    captions = list(rows["caption"])
    result = evaluate_generation(Oracle(processor.tokenizer, captions), processor, rows, progress=False)
    assert result["num_examples"] == rows.num_rows == 6
    assert result["cider"] == pytest.approx(cider_d(captions, [[caption] for caption in captions]))


def test_vqa_accuracy_overall_and_per_type(processor, vqa_data):
    answers, types = list(vqa_data["answer"]), list(vqa_data["question_type"])
    oracle = Oracle(processor.tokenizer, answers)
    result = evaluate_generation(oracle, processor, vqa_data, task="vqa", batch_size=4, progress=False)
    assert result["vqa_accuracy"] == 1.0
    assert result["vqa_accuracy_per_type"] == {question_type: 1.0 for question_type in set(types)}

    # Wrong on every question of one type only: that type drops to 0, the others stay at 1.
    bad_type = types[0]
    guesses = ["zzz" if question_type == bad_type else answer for answer, question_type in zip(answers, types)]
    wrong = evaluate_generation(Oracle(processor.tokenizer, guesses), processor, vqa_data, task="vqa", progress=False)
    assert wrong["vqa_accuracy"] == pytest.approx(1 - types.count(bad_type) / len(types))
    assert wrong["vqa_accuracy_per_type"] == {t: float(t != bad_type) for t in set(types)}


def test_vqa_list_answers_and_prompt_template(processor, vqa_data):
    rows = vqa_data.remove_columns("question_type").map(lambda row: {"answer": [row["answer"], "no"]})
    oracle = Oracle(processor.tokenizer, ["no"] * rows.num_rows)
    result = evaluate_generation(oracle, processor, rows, task="vqa", prompt="{question} answer", progress=False)
    assert result["vqa_accuracy"] == 1.0 and "vqa_accuracy_per_type" not in result


# ---------------------------------------------------------------------------------------------------------------------
# Errors and docs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task,drop,match",
    [
        ("retrieval", [], "Unknown task"),
        ("vqa", ["answer"], r"needs the columns .*'answer'"),
        ("caption", ["caption"], r"needs the columns .*'captions'.*or a `caption` column"),
        ("caption", ["image"], r"needs the columns .*'image'"),
    ],
)
def test_bad_input_raises(processor, caption_pairs, vqa_data, task, drop, match):
    data = (vqa_data if task == "vqa" else caption_pairs).remove_columns(drop)
    with pytest.raises(ValueError, match=match):
        evaluate_generation(Oracle(processor.tokenizer, []), processor, data, task=task, progress=False)


def test_empty_or_non_dataset_input_raises(processor, vqa_data):
    with pytest.raises(ValueError, match="empty"):
        evaluate_generation(Oracle(processor.tokenizer, []), processor, vqa_data.select([]), task="vqa")
    with pytest.raises(ValueError, match="datasets.Dataset"):
        evaluate_generation(Oracle(processor.tokenizer, []), processor, [vqa_data[0]], task="vqa")


def test_instructblip_q_former_reads_the_question_not_the_rendered_chat(processor, vqa_data):
    """With a Q-Former tokenizer, each row's Q-Former text is its question alone, as ChatCollator trains it (the
    user's message), not the chat template's rendering with role words."""
    from vlbridge.processing import BridgeProcessor

    instruct = BridgeProcessor(
        processor.image_processor,
        processor.tokenizer,
        qformer_tokenizer=processor.tokenizer,
        num_image_tokens=processor.num_image_tokens,
    )
    questions = list(vqa_data["question"])
    oracle = Oracle(processor.tokenizer, list(vqa_data["answer"]))
    evaluate_generation(oracle, instruct, vqa_data, task="vqa", batch_size=4, progress=False)
    seen = [
        processor.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for call in oracle.calls
        for ids, mask in zip(call["qformer_input_ids"], call["qformer_attention_mask"])
    ]
    assert [text.replace(" ", "") for text in seen] == [question.replace(" ", "") for question in questions]
