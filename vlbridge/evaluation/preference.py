"""Preference accuracy: how often a model gives the chosen answer of a preference pair a higher log-probability than
the rejected one, with the sequences built exactly as TRL's `DPOTrainer` builds them; and how often it *says* the
chosen answer when it generates."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import takewhile

import torch
from torch import nn
from torch.nn import functional as F

from ..data.synthetic import require_datasets
from .generation import evaluate_generation


def _render(processor, example: dict) -> tuple[str, str, str]:
    """`(prompt, chosen, rejected)` texts, split the way TRL's `apply_chat_template` splits them."""
    prompt_messages = list(example["prompt"])
    last_is_user = prompt_messages[-1]["role"] == "user"
    prompt = processor.apply_chat_template(
        prompt_messages, add_generation_prompt=last_is_user, continue_final_message=not last_is_user, tokenize=False
    )
    texts = [
        processor.apply_chat_template(prompt_messages + list(example[key]), tokenize=False)
        for key in ("chosen", "rejected")
    ]
    # The prompt is the part every rendering shares (a template may write the generation prompt differently).
    for text in texts:
        prompt = "".join(a for a, _ in takewhile(lambda pair: pair[0] == pair[1], zip(prompt, text)))
    return prompt, texts[0][len(prompt) :], texts[1][len(prompt) :]


def _images(example: dict) -> list:
    """A preference row's images: its `images` list, or its one `image` (TRL accepts both columns)."""
    return list(example.get("images") or ([example["image"]] if example.get("image") is not None else []))


def _batch(processor, examples: list[dict]) -> tuple[dict, torch.Tensor]:
    """Model inputs for `[chosen..., rejected...]` (2B rows, right-padded) and the mask of the completion tokens."""
    rendered = [_render(processor, example) for example in examples]
    images = [_images(example) for example in examples]
    prompts = processor(
        images=images * 2 if any(images) else None,
        text=[prompt for prompt, _, _ in rendered] * 2,
        padding=True,
        padding_side="left",
        add_special_tokens=False,
        return_tensors="pt",
    )
    completions = processor.tokenizer(
        [chosen for _, chosen, _ in rendered] + [rejected for _, _, rejected in rendered], add_special_tokens=False
    )["input_ids"]
    rows = [
        ids[mask.bool()].tolist() + completion
        for ids, mask, completion in zip(prompts["input_ids"], prompts["attention_mask"], completions)
    ]
    length = max(len(row) for row in rows)
    pad_id = processor.tokenizer.pad_token_id
    pad_id = processor.tokenizer.eos_token_id if pad_id is None else pad_id
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (row, completion) in enumerate(zip(rows, completions)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, len(row) - len(completion) : len(row)] = True
    inputs = {key: value for key, value in prompts.items() if key not in ("input_ids", "attention_mask")}
    inputs.update(input_ids=input_ids, attention_mask=attention_mask)
    return inputs, completion_mask


@torch.no_grad()
def preference_log_probs(
    model: nn.Module, processor, dataset: Iterable[dict], batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Summed log-probabilities of the chosen and of the rejected completion of every preference pair.

    The sequences are those TRL's `DPOTrainer` trains on: the prompt rendered with the processor's chat template and a
    generation prompt, tokenized with its images, then each completion (the rest of the rendered conversation, EOS
    included) tokenized without special tokens and appended, padding on the right.

    Args:
        model ([`BridgeVLMForConditionalGeneration`] or a `peft.PeftModel` around one):
            The policy; run in eval mode (its training mode is restored afterwards).
        processor ([`BridgeProcessor`]):
            Its processor, with a chat template.
        dataset (`datasets.Dataset` or iterable of `dict`):
            Conversational preference rows: `prompt`, `chosen`, `rejected` (lists of messages) and `images` (or
            `image`), e.g. from [`~vlbridge.data.make_synthetic_preference`].
        batch_size (`int`, *optional*, defaults to 8):
            Pairs per forward pass (the model sees twice as many rows).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the chosen and the rejected log-probabilities, shape `(num_pairs,)`, fp32
        on the CPU.

    Example:

    ```python
    >>> from vlbridge.evaluation import preference_log_probs
    >>> chosen, rejected = preference_log_probs(model, processor, data["test"])  # doctest: +SKIP
    >>> (chosen - rejected).mean()  # doctest: +SKIP
    tensor(0.4170)
    ```
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    rows = list(dataset) if not hasattr(dataset, "select") else dataset
    try:
        for start in range(0, len(rows), batch_size):
            examples = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
            inputs, completion_mask = _batch(processor, examples)
            inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs.items()}
            logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # (2B, T-1, V)
            targets = inputs["input_ids"][:, 1:]
            token_log_probs = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            sums = (token_log_probs * completion_mask[:, 1:].to(device)).sum(-1).cpu()
            chosen.append(sums[: len(examples)])
            rejected.append(sums[len(examples) :])
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def _summary(margins: torch.Tensor) -> dict:
    return {
        "accuracy": (margins > 0).float().mean().item(),
        "margin": margins.mean().item(),
        "num_pairs": len(margins),
    }


def preference_accuracy(
    model: nn.Module, processor, dataset: Iterable[dict], batch_size: int = 8, group_by: str | None = None
) -> dict:
    """
    Preference accuracy: the fraction of pairs whose chosen completion the model finds more likely than the rejected
    one (chosen log-prob minus rejected log-prob above 0), with the mean of that margin.

    Args:
        model ([`BridgeVLMForConditionalGeneration`] or a `peft.PeftModel` around one):
            The policy.
        processor ([`BridgeProcessor`]):
            Its processor.
        dataset (`datasets.Dataset` or iterable of `dict`):
            Preference rows (`prompt`, `chosen`, `rejected`, `images`); see [`preference_log_probs`].
        batch_size (`int`, *optional*, defaults to 8):
            Pairs per forward pass.
        group_by (`str`, *optional*):
            A column (e.g. `"pair_type"` or `"edit"` of [`~vlbridge.data.make_synthetic_preference`]) to break the
            result down by, under `"groups"`.

    Returns:
        `dict`: `accuracy` (`float` in [0, 1]), `margin` (mean chosen minus rejected log-prob), `num_pairs`, and with
        `group_by`, `groups`: the same three per value of that column.

    Example:

    ```python
    >>> from vlbridge.evaluation import preference_accuracy
    >>> preference_accuracy(model, processor, data["test"], group_by="pair_type")  # doctest: +SKIP
    {'accuracy': 0.94, 'margin': 3.21, 'num_pairs': 200, 'groups': {'absent': {...}, 'caption': {...}, ...}}
    ```
    """
    rows = dataset if hasattr(dataset, "column_names") else list(dataset)
    chosen, rejected = preference_log_probs(model, processor, rows, batch_size)
    margins = chosen - rejected
    result = _summary(margins)
    if group_by is not None:
        keys = list(rows[group_by]) if hasattr(rows, "column_names") else [row[group_by] for row in rows]
        result["groups"] = {
            key: _summary(margins[[i for i, other in enumerate(keys) if other == key]]) for key in sorted(set(keys))
        }
    return result


def _question_rows(rows, group_by: str | None):
    """A VQA dataset (`image`, `question`, `answer`, `question_type`) of single-turn, one-image preference rows."""
    datasets = require_datasets()
    columns: dict[str, list] = {"image": [], "question": [], "answer": [], "question_type": []}
    for row in rows:
        prompt, chosen = list(row["prompt"]), list(row["chosen"])
        images = _images(row)
        entries = prompt[0]["content"] if len(prompt) == 1 and prompt[0]["role"] == "user" else []
        texts = [entry["text"] for entry in entries if entry["type"] == "text"]
        if len(images) != 1 or len(texts) != 1 or len(entries) != 2 or len(chosen) != 1:
            raise ValueError(
                "`preference_answer_accuracy` takes rows with one user turn of one image and one text, and one chosen "
                "assistant message."
            )
        columns["image"].append(images[0])
        columns["question"].append(texts[0])
        columns["answer"].append(" ".join(e["text"] for e in chosen[0]["content"] if e["type"] == "text"))
        columns["question_type"].append(row[group_by] if group_by else "all")
    features = datasets.Features(
        {"image": datasets.Image(), **{key: datasets.Value("string") for key in columns if key != "image"}}
    )
    return datasets.Dataset.from_dict(columns, features=features)


def preference_answer_accuracy(
    model: nn.Module,
    processor,
    dataset: Iterable[dict],
    group_by: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    progress: bool = True,
) -> dict:
    """
    How often greedy generation gives the chosen answer of a preference pair (VQA-normalised exact match).

    [`preference_accuracy`] compares log-probabilities; DPO can widen that margin while lowering both sides, until
    generation says neither answer (a known failure: "likelihood displacement"). This scores what the model says,
    so a run that wins margins but breaks generation shows it.

    Args:
        model ([`BridgeVLMForConditionalGeneration`] or a `peft.PeftModel` around one):
            The policy.
        processor ([`BridgeProcessor`]):
            Its processor, with a chat template.
        dataset (`datasets.Dataset` or iterable of `dict`):
            Preference rows with one user turn of one image and one text (`prompt`, `images`) and one chosen
            assistant message, e.g. from [`~vlbridge.data.make_synthetic_preference`].
        group_by (`str`, *optional*):
            A column (e.g. `"pair_type"`) to break the result down by, under `"groups"`.
        batch_size (`int`, *optional*, defaults to 16):
            Rows per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to 24):
            Most tokens generated per row (the longest chosen answer should fit).
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.

    Returns:
        `dict`: `accuracy` (`float` in [0, 1]), `num_pairs`, `predictions` (one string per row), and with `group_by`,
        `groups`: `{value: {"accuracy": ...}}`.

    Example:

    ```python
    >>> from vlbridge.evaluation import preference_answer_accuracy
    >>> preference_answer_accuracy(model, processor, data["test"], group_by="pair_type")  # doctest: +SKIP
    {'accuracy': 0.81, 'num_pairs': 200, 'predictions': [...], 'groups': {'absent': {'accuracy': 0.0}, ...}}
    ```
    """
    rows = dataset if hasattr(dataset, "column_names") else list(dataset)
    questions = _question_rows(rows, group_by)
    result = evaluate_generation(
        model,
        processor,
        questions,
        task="vqa",
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    summary = {"accuracy": result["vqa_accuracy"], "num_pairs": questions.num_rows}
    summary["predictions"] = result["predictions"]
    if group_by is not None:
        summary["groups"] = {key: {"accuracy": value} for key, value in result["vqa_accuracy_per_type"].items()}
    return summary


__all__ = ["preference_accuracy", "preference_answer_accuracy", "preference_log_probs"]
