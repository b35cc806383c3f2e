"""
Generative evaluation of a bridged VLM: greedy captions scored with CIDEr-D and BLEU, or greedy answers scored with
VQA accuracy (overall and per question type).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.synthetic import group_captions
from ..metrics.caption_metrics import bleu, cider_d, vqa_accuracy
from ..processing.image_utils import to_rgb_image


TASKS = ("caption", "vqa")
DEFAULT_CAPTION_PROMPT = "describe the image."


def evaluate_generation(
    model,
    processor,
    dataset,
    task: str = "caption",
    batch_size: int = 16,
    max_new_tokens: int = 30,
    prompt: str | None = None,
    num_samples: int = 5,
    progress: bool = True,
    use_chat_template: bool = True,
    **generate_kwargs,
) -> dict[str, Any]:
    """
    Generates greedily over a dataset and scores the outputs.

    Every row becomes one user turn `[{"type": "image"}, {"type": "text", "text": ...}]` rendered by the processor's
    chat template with `add_generation_prompt=True`. Batches are left-padded, so a decoder-only language model
    continues every prompt from its last real token and batching does not change the answers; only the new tokens
    are decoded (`skip_special_tokens=True`).

    - `task="caption"`: rows with `image` and `captions` (a list of references per image). A `caption` column is
      accepted too: rows are merged per `image_id` with `vlbridge.data.group_captions` when that column exists, else
      each row is one image with one reference. The text is `prompt` (default `"describe the image."`). Returns
      `cider` (CIDEr-D, see `cider_d`) and `bleu1` .. `bleu4`.
    - `task="vqa"`: rows with `image`, `question` and `answer` (a string or a list of human answers). The text is
      `prompt.format(question=...)` (default: the question itself). Returns `vqa_accuracy`, and
      `vqa_accuracy_per_type` (`{question_type: accuracy}`) when a `question_type` column exists.

    Both also return `predictions` (one string per image / question, in dataset order) and `samples`: the first
    `num_samples` `{"references": [...], "prediction": ...}` pairs, to read next to the numbers.

    Args:
        model ([`BridgeVLMForConditionalGeneration`] or any model with `generate`):
            The model; it is put in eval mode (and back in train mode afterwards if it was training).
        processor ([`BridgeProcessor`]):
            Renders the chat template, processes images and tokenizes.
        dataset (`datasets.Dataset`):
            The rows described above; images are decoded one batch at a time.
        task (`str`, *optional*, defaults to `"caption"`):
            `"caption"` or `"vqa"`.
        batch_size (`int`, *optional*, defaults to 16):
            Rows per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to 30):
            Most tokens generated per row.
        prompt (`str`, *optional*):
            The user text (caption) or a template with `{question}` (VQA).
        num_samples (`int`, *optional*, defaults to 5):
            How many `(references, prediction)` pairs to return in `samples`.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar.
        use_chat_template (`bool`, *optional*, defaults to `True`):
            `False` lays the input out as [`CaptionCollator`] trains stage 2, `<image> prompt` with no chat turn
            (the caption prompt then defaults to none). Evaluate a stage-2 model this way: in a chat layout it never
            saw, its captions say little about what it learned.
        generate_kwargs:
            Passed to `model.generate` (e.g. `num_beams`); decoding is greedy unless they say otherwise.

    Returns:
        `dict[str, Any]`: the metrics above (floats), plus `predictions`, `samples` and `num_examples`.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> import torch
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import PreTrainedTokenizerFast, SiglipImageProcessorPil
    >>> from vlbridge.data import make_synthetic_vqa
    >>> from vlbridge.processing import BridgeProcessor
    >>> from vlbridge.evaluation import evaluate_generation

    >>> data = make_synthetic_vqa({"test": 2}, image_size=32, questions_per_image=2)["test"]
    >>> texts = list(data["question"]) + list(data["answer"])
    >>> words = {word for text in texts for word in text.replace("?", " ?").split()}
    >>> vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "user", ":", "assistant", *sorted(words)])}
    >>> backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    >>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    >>> processor = BridgeProcessor(SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer)

    >>> class Oracle(torch.nn.Module):  # "generates" the right answers, to show the scoring
    ...     config = SimpleNamespace(is_encoder_decoder=False)
    ...     def __init__(self, answers):
    ...         super().__init__()
    ...         self.answers = list(answers)
    ...     def generate(self, input_ids, **kwargs):
    ...         batch, self.answers = self.answers[: len(input_ids)], self.answers[len(input_ids) :]
    ...         new = tokenizer(batch, padding=True, return_tensors="pt")["input_ids"]
    ...         return torch.cat([input_ids, new], dim=1)

    >>> result = evaluate_generation(Oracle(data["answer"]), processor, data, task="vqa", progress=False)
    >>> result["vqa_accuracy"], result["num_examples"]
    (1.0, 4)
    ```
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"`batch_size` and `max_new_tokens` must be positive, got {batch_size} and {max_new_tokens}.")
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise ValueError(f"`dataset` must be a `datasets.Dataset`, got {type(dataset).__name__}.")
    if task == "caption":
        if prompt is None and not use_chat_template:
            prompt = ""  # CaptionCollator's default: the caption follows the image tokens directly
        dataset, texts, references = _caption_rows(dataset, prompt)
    else:
        texts, references = _vqa_rows(dataset, prompt)
    if not texts:
        raise ValueError("`dataset` is empty: there is nothing to evaluate.")

    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}] for text in texts
    ]
    # InstructBLIP: the Q-Former reads each row's user message, from the same `qformer_instructions` that ChatCollator
    # trains with, not the rendered chat (whose role words another chat template would leave in).
    instructions = None
    if getattr(processor, "qformer_tokenizer", None) is not None:
        instructions = [processor.qformer_instructions(messages)[0] for messages in conversations]
    if use_chat_template:
        texts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    else:
        texts = [" ".join(part for part in (processor.image_token, text) if part) for text in texts]
    predictions = _generate(
        model, processor, dataset, texts, batch_size, max_new_tokens, progress, generate_kwargs, instructions
    )

    result: dict[str, Any] = {}
    if task == "caption":
        result["cider"] = cider_d(predictions, references)
        result.update(bleu(predictions, references))
    else:
        result["vqa_accuracy"] = vqa_accuracy(predictions, references)
        if "question_type" in dataset.column_names:
            by_type: dict[str, list[int]] = {}
            for index, question_type in enumerate(dataset["question_type"]):
                by_type.setdefault(question_type, []).append(index)
            result["vqa_accuracy_per_type"] = {
                question_type: vqa_accuracy([predictions[i] for i in rows], [references[i] for i in rows])
                for question_type, rows in sorted(by_type.items())
            }
    result["num_examples"] = len(predictions)
    result["predictions"] = predictions
    result["samples"] = [
        {"references": refs, "prediction": prediction}
        for refs, prediction in zip(references[:num_samples], predictions[:num_samples])
    ]
    return result


def _require(dataset, needed: tuple[str, ...], task: str, hint: str = "") -> None:
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"task={task!r} needs the columns {list(needed)}{hint}; {missing} missing from {dataset.column_names}."
        )


def _caption_rows(dataset, prompt: str | None):
    """The dataset with one row per image, the user text of each row and the reference captions of each image."""
    if "captions" not in dataset.column_names and "caption" in dataset.column_names:
        if "image_id" in dataset.column_names:
            dataset = group_captions(dataset)
            references = [list(captions) for captions in dataset["captions"]]
        else:
            references = [[caption] for caption in dataset["caption"]]
    else:
        _require(dataset, ("image", "captions"), "caption", hint=" (or a `caption` column)")
        references = [list(captions) for captions in dataset["captions"]]
    _require(dataset, ("image",), "caption")
    for index, refs in enumerate(references):
        if not refs or not all(isinstance(ref, str) for ref in refs):
            raise ValueError(f"Image {index} needs at least one reference caption (strings), got {refs!r}.")
    return dataset, [DEFAULT_CAPTION_PROMPT if prompt is None else prompt] * len(references), references


def _vqa_rows(dataset, prompt: str | None):
    """The user text of each question and its reference answers (always a list)."""
    _require(dataset, ("image", "question", "answer"), "vqa")
    texts = [prompt.format(question=question) if prompt else question for question in dataset["question"]]
    references = [[answer] if isinstance(answer, str) else list(answer) for answer in dataset["answer"]]
    return texts, references


@torch.no_grad()
def _generate(
    model, processor, dataset, texts, batch_size, max_new_tokens, progress, generate_kwargs, instructions=None
) -> list[str]:
    """Greedy generation over the `texts` (each with its row's image placeholder), left-padded batches; the
    Q-Former's text is `instructions` when given."""
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    tokenizer = processor.tokenizer
    # An encoder-decoder model returns only decoder tokens; a decoder-only one returns the prompt first.
    keeps_prompt = not getattr(model.config, "is_encoder_decoder", False)
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
    if tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    predictions: list[str] = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="generate", disable=not progress):
            stop = min(start + batch_size, len(texts))
            images = [to_rgb_image(image) for image in dataset[start:stop]["image"]]
            inputs = processor(
                images=[[image] for image in images],
                text=texts[start:stop],
                padding=True,
                padding_side="left",  # batched decoder-only generation continues from the last real token
                return_tensors="pt",
            )
            if instructions is not None:
                inputs.update(
                    processor.encode_qformer_text(instructions[start:stop], padding=True, return_tensors="pt")
                )
            inputs = inputs.to(device)
            ids = model.generate(**inputs, **kwargs)
            if keeps_prompt:
                ids = ids[:, inputs["input_ids"].shape[1] :]
            predictions.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [prediction.strip() for prediction in predictions]


__all__ = ["evaluate_generation"]
