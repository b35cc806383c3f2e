"""
Saved checkpoint folders as the training scripts leave them: self-describing (processor, `auto_map`, a model card
naming the stage, the data and the metrics), and checked before loading.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..modeling.saving import add_auto_map, write_model_card


def describe_checkpoint(
    output_dir: str | Path,
    *,
    stage: str,
    data: str,
    metrics: Mapping[str, object] | None = None,
    processor=None,
    base_models: str | list[str] | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    extra: str = "",
) -> Path:
    """
    Makes a checkpoint written by `save_pretrained` self-describing: saves `processor` (its files and chat template)
    beside it when given, adds `auto_map` ([`add_auto_map`]) and writes the model card ([`write_model_card`]). Every
    training stage calls this after saving (`finish_training`, `examples/stage1.py`).

    Args:
        output_dir (`str` or `Path`): The checkpoint folder.
        stage (`str`): The training stage (`"stage1"`, `"stage2"`, `"sft"`, `"dpo"`, ...).
        data (`str`): What it was trained on, in words.
        metrics (`dict[str, float]`, *optional*): The metrics the run measured.
        processor ([`BridgeProcessor`], *optional*): Saved into `output_dir` first.
        base_models, datasets, tags, extra: See [`write_model_card`].

    Returns:
        `Path`: The path of `README.md`.

    Example:

    ```python
    >>> import tempfile
    >>> from vlbridge import QFormerConfig
    >>> from vlbridge.hub import describe_checkpoint
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     QFormerConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp)
    ...     card = describe_checkpoint(tmp, stage="stage1", data="built-in scenes", metrics={"itm_accuracy": 0.9})
    ...     sorted(path.name for path in card.parent.iterdir())
    ['README.md', 'config.json', 'vlbridge_auto.py']

    ```"""
    if processor is not None:
        processor.save_pretrained(output_dir)
    add_auto_map(output_dir)
    return write_model_card(
        output_dir,
        stage=stage,
        data=data,
        metrics=metrics,
        base_models=base_models,
        datasets=datasets,
        tags=tags,
        extra=extra,
    )


# What a Trainer, or its collator, says about the stage it runs (TRL trainers also tag themselves, `_tag_names`).
_STAGE_HINTS = {
    "Stage1Trainer": "stage1",
    "DPOTrainer": "dpo",
    "SFTTrainer": "sft",
    "CaptionCollator": "stage2",
    "ChatCollator": "sft",
    "ImageTextCollator": "stage1",
}


def infer_stage(trainer) -> str:
    """
    The training stage a trainer runs, from its class, its collator's class or its TRL tags: `"stage1"`,
    `"stage2"`, `"sft"`, `"dpo"`, or `"training"` when nothing says.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> from vlbridge.hub.checkpoint import infer_stage
    >>> class CaptionCollator: ...
    >>> infer_stage(SimpleNamespace(data_collator=CaptionCollator())), infer_stage(SimpleNamespace(_tag_names=["dpo"]))
    ('stage2', 'dpo')

    ```"""
    classes = (*type(trainer).__mro__, *type(getattr(trainer, "data_collator", None)).__mro__)
    for cls in classes:
        if cls.__name__ in _STAGE_HINTS:
            return _STAGE_HINTS[cls.__name__]
    tags = getattr(trainer, "_tag_names", None) or []
    return next((tag for tag in ("dpo", "sft") if tag in tags), "training")


def describe_train_data(dataset) -> str:
    """
    The training data in words for the model card: size, columns and the dataset's own description, if any.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from vlbridge.hub.checkpoint import describe_train_data
    >>> describe_train_data(Dataset.from_dict({"image": [None] * 3, "caption": ["a", "b", "c"]}))
    '3 training examples (columns: `image`, `caption`).'

    ```"""
    if dataset is None:
        return "Not recorded."
    try:
        size = f"{len(dataset):,} training examples"
    except TypeError:  # an iterable (streamed) dataset
        size = "A streamed training set"
    columns = getattr(dataset, "column_names", None)
    text = f"{size} (columns: {', '.join(f'`{column}`' for column in columns)})." if columns else f"{size}."
    description = getattr(getattr(dataset, "info", None), "description", None)
    return f"{text} {description.strip()}" if description and description.strip() else text


def check_model_folder(path: str | os.PathLike) -> None:
    """
    Refuses, with the fix, a folder that holds a LoRA adapter (`adapter_config.json`, no `config.json`) where a full
    model is expected: loading it would fail deep inside transformers.

    Example:

    ```python
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from vlbridge.hub.checkpoint import check_model_folder
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    >>> check_model_folder(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ... holds a LoRA adapter (adapter_config.json), not a model: ...
    ```"""
    folder = Path(path)
    if folder.is_dir() and (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        merged = folder.parent / "merged"
        hint = f" ({merged} is the merged model of this run)" if (merged / "config.json").is_file() else ""
        raise ValueError(
            f"{folder} holds a LoRA adapter (adapter_config.json), not a model: pass the merged model that "
            f"`vlbridge dpo` saves in <output_dir>/merged{hint}, or merge the adapter with peft "
            "(PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(folder))."
        )


__all__ = ["check_model_folder", "describe_checkpoint", "describe_train_data", "infer_stage"]
