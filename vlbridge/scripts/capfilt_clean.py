"""
`vlbridge capfilt --clean_dataset`: BLIP fine-tunes its captioner and its filter on a small clean, human-annotated
set (COCO) before bootstrapping the web data: the captioner with the LM loss alone (ITG here), the filter with ITC and
ITM. This module does that with [`Stage1Trainer`] on copies of the two models, saves them (with tokenizer, image
processor and a model card) into `<output_dir>/captioner` and `<output_dir>/filter`, and records their held-out
metrics before and after, which the run's summary repeats.

A fine-tuned folder is finished once its `capfilt_finetune.json` is written, last; `--resume` reuses a finished one
and retrains one that a killed run left unfinished. The clean set is small and the fine-tune short, so it runs in
the first process alone (with the launcher's process-group variables hidden from the Trainer) while the others wait
for its folders: every process then filters with the same weights, and a multi-process run writes what a single
process writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..data import Scene, group_captions, make_synthetic_image_text
from ..data.shards import ShardRows
from ..data.synthetic import describe_positions
from ..data.user import load_user_dataset
from ..evaluation import evaluate_stage1
from ..hub.checkpoint import describe_checkpoint
from ..trainers import ImageTextCollator, Stage1Config, Stage1Trainer


if TYPE_CHECKING:
    from datasets import Dataset

    from .capfilt import CapFiltArguments
    from .capfilt_models import CapFiltModel

# Written last into a fine-tuned folder: its presence means the folder is whole.
FINETUNE_FILE = "capfilt_finetune.json"
# The losses each role keeps (BLIP: the captioner learns LM alone, the filter ITC + ITM); the others are weighted 0.
ROLE_WEIGHTS = {
    "captioner": {"itc_weight": 0.0, "itm_weight": 0.0},
    "filter": {"itg_weight": 0.0},
}
# Held-out retrieval re-ranks this many candidates with ITM (as `vlbridge stage1`'s default).
K_TEST = 16
# What the Trainer must not see while the first process fine-tunes alone: the launcher's process-group variables.
_PROCESS_GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


@dataclass
class CleanData:
    """
    The clean set split by image.

    Args:
        train (`datasets.Dataset`): (image, caption) rows to fine-tune on.
        held_out (`datasets.Dataset`): One row per held-out image with its `captions`, for the metrics.
        source (`str`): What it is, in words (for the model cards and the summary).
    """

    train: Dataset
    held_out: Dataset
    source: str


def _web_scenes(web: Dataset | ShardRows) -> set[str]:
    """The scenes of built-in web data (their most specific caption), which the built-in clean set must avoid."""
    if isinstance(web, ShardRows) or "objects" not in web.column_names:
        return set()  # a user's images are no built-in scene
    return {describe_positions(Scene.from_objects(objects)) for objects in web["objects"]}


def _builtin_clean_pairs(args: CapFiltArguments, web: Dataset | ShardRows) -> Dataset:
    """`args.clean_images` built-in images of seed `args.clean_seed_value`, none of them showing a web scene."""
    taken, extra = _web_scenes(web), 0
    while True:
        # A split's scenes depend only on (seed, split), so asking for more images keeps the first ones.
        data = make_synthetic_image_text(
            {"train": args.clean_images + extra},
            image_size=args.image_size,
            seed=args.clean_seed_value,
            captions_per_image=args.clean_captions_per_image,
            max_objects=args.max_objects,
        )["train"]
        first_rows: dict[int, int] = {}
        for row, image_id in enumerate(data["image_id"]):
            first_rows.setdefault(image_id, row)
        objects = data.select(list(first_rows.values()))["objects"]
        fresh = [
            image_id
            for image_id, scene in zip(first_rows, objects)
            if describe_positions(Scene.from_objects(scene)) not in taken
        ]
        if len(fresh) >= args.clean_images:
            break
        extra += args.clean_images - len(fresh)
    keep = set(fresh[: args.clean_images])
    return data.select([row for row, image_id in enumerate(data["image_id"]) if image_id in keep])


def load_clean_data(args: CapFiltArguments, web: Dataset | ShardRows) -> CleanData:
    """
    The clean set of `args.clean_dataset`, split by image into a training part and `args.clean_eval_fraction` held
    out, checked to be usable before anything is written.

    Args:
        args ([`CapFiltArguments`]): The run's arguments.
        web (`datasets.Dataset` or [`~vlbridge.data.shards.ShardRows`]): The web data, whose built-in scenes the
            built-in clean set avoids.

    Returns:
        [`CleanData`]
    """
    if args.clean_dataset == "builtin":
        pairs = _builtin_clean_pairs(args, web)
        source = f"{args.clean_images} built-in images (seed {args.clean_seed_value}), none of them a web image"
    else:
        command = "vlbridge capfilt --clean_dataset"
        pairs = load_user_dataset(args.clean_dataset, "captions", command, args.allow_outside_paths)
        if "image_id" not in pairs.column_names:
            pairs = pairs.add_column("image_id", list(range(len(pairs))))
        source = args.clean_dataset
    images = group_captions(pairs)
    if len(images) < 4:
        raise ValueError(
            f"--clean_dataset {args.clean_dataset} holds {len(images)} image(s): fine-tuning and its held-out "
            "metrics need a few images more (BLIP uses COCO's 113k)."
        )
    split = images.train_test_split(test_size=args.clean_eval_fraction, seed=args.clean_seed_value)
    held_out = split["test"]
    held_ids = set(held_out["image_id"])
    train = pairs.select([row for row, image_id in enumerate(pairs["image_id"]) if image_id not in held_ids])
    if len(held_out) < 2:
        raise ValueError(
            f"--clean_eval_fraction {args.clean_eval_fraction} holds out {len(held_out)} of the {len(images)} clean "
            "images; the held-out metrics compare each image with another: raise it, or the clean set's size."
        )
    if len(train) < args.clean_batch_size:
        raise ValueError(
            f"The clean set has {len(train)} training captions, fewer than --clean_batch_size "
            f"{args.clean_batch_size}: lower it, or give more clean images."
        )
    return CleanData(train, held_out, source)


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """Hides the launcher's process-group variables, so that the Trainer runs in this process alone."""
    hidden = {name: os.environ.pop(name) for name in _PROCESS_GROUP_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(hidden)


def _held_out_metrics(model, clean: CleanData, collator: ImageTextCollator) -> dict[str, float]:
    """`vlbridge stage1`'s held-out metrics (retrieval recall, ITM accuracy, exact greedy captions)."""
    metrics = evaluate_stage1(model, clean.held_out, collator, k_test=min(K_TEST, len(clean.held_out)))
    metrics.pop("samples", None)
    return metrics


def _save(role: str, bundle: CapFiltModel, folder: Path, clean: CleanData, metrics: dict) -> None:
    """The fine-tuned model with its tokenizer, image processor and a model card."""
    bundle.model.save_pretrained(folder)
    processor = bundle.processor
    if processor is None:  # a folder saved without a processor: the two parts as they came
        bundle.tokenizer.save_pretrained(folder)
        bundle.image_processor.save_pretrained(folder)
    losses = "ITG (LM) alone" if role == "captioner" else "ITC + ITM"
    describe_checkpoint(
        folder,
        stage=f"capfilt-{role}",
        data=f"{bundle.path} fine-tuned with {losses} on {clean.source} ({len(clean.train)} captions; metrics on "
        f"{len(clean.held_out)} held-out images), as BLIP's CapFilt {role}.",
        metrics=metrics,
        processor=processor,
        tags=["capfilt"],
    )


def finetune_role(role: str, bundle: CapFiltModel, clean: CleanData, args: CapFiltArguments, folder: Path) -> dict:
    """
    Fine-tunes `bundle.model` (a copy in memory; its folder is not written) on the clean set with the losses of
    `role`, saves it into `folder` and returns what [`FINETUNE_FILE`] records.

    Args:
        role (`str`): `"captioner"` or `"filter"`.
        bundle ([`CapFiltModel`]): The loaded model with its tokenizer and image processor.
        clean ([`CleanData`]): The clean set.
        args ([`CapFiltArguments`]): Steps, learning rate, batch size and seed of the fine-tune.
        folder (`Path`): Where it is saved.

    Returns:
        `dict`: `role`, `base` (the folder it came from), `steps`, `train_captions`, `held_out_images`, and the
        held-out metrics `before` and `after`.
    """
    model, config = bundle.model, bundle.model.config
    missing = [name for name in ("itc_weight", "itm_weight", "itg_weight") if not hasattr(config, name)]
    if missing:
        raise ValueError(
            f"--{role} {bundle.path} is a {type(model).__name__} whose config has no {', '.join(missing)}: "
            "--clean_dataset fine-tunes with Stage1Trainer, which weighs the ITC / ITM / ITG losses by them."
        )
    for name, value in ROLE_WEIGHTS[role].items():
        setattr(config, name, value)
    training_args = Stage1Config(
        output_dir=str(folder),
        max_steps=args.clean_steps,
        learning_rate=args.clean_learning_rate,
        per_device_train_batch_size=args.clean_batch_size,
        # ITC / ITM compare the captions of a batch with each other: no short last batch.
        dataloader_drop_last=True,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    collator = ImageTextCollator(bundle.image_processor, bundle.tokenizer, max_length=training_args.max_text_length)
    before = _held_out_metrics(model, clean, collator)
    trainer = Stage1Trainer(model=model, args=training_args, train_dataset=clean.train, data_collator=collator)
    trainer.train()
    after = _held_out_metrics(model, clean, collator)
    _save(role, bundle, folder, clean, after)
    record = {
        "role": role,
        "base": str(bundle.path),
        "steps": args.clean_steps,
        "train_captions": len(clean.train),
        "held_out_images": len(clean.held_out),
        "before": before,
        "after": after,
    }
    (folder / FINETUNE_FILE).write_text(json.dumps(record, indent=2))
    return record


def finetune_models(
    args: CapFiltArguments,
    models: dict[str, CapFiltModel],
    clean: CleanData,
    output: Path,
    rank: int = 0,
    poll_seconds: float = 2.0,
) -> dict[str, dict]:
    """
    The fine-tuned captioner and filter in `<output>/captioner` and `<output>/filter`: trained by the first process
    (a finished folder of a resumed run is reused), waited for by the others.

    Args:
        args ([`CapFiltArguments`]): The run's arguments.
        models (`dict[str, CapFiltModel]`): `{"captioner": ..., "filter": ...}` as loaded from their folders.
        clean ([`CleanData`]): The clean set.
        output (`Path`): The run's output folder.
        rank (`int`, *optional*, defaults to 0): This process (`RANK`).
        poll_seconds (`float`, *optional*, defaults to 2.0): How often the other processes look for the folders.

    Returns:
        `dict[str, dict]`: Per role, its folder (`path`) and the record of its fine-tune ([`finetune_role`]).
    """
    records = {}
    for role, bundle in models.items():
        folder = output / role
        marker = folder / FINETUNE_FILE
        if rank == 0 and not marker.is_file():
            with _single_process():
                finetune_role(role, bundle, clean, args, folder)
        elif rank == 0:
            print(f"--resume: reusing the fine-tuned {role} in {folder}", flush=True)
        while not marker.is_file():  # another process: the first one is still fine-tuning
            time.sleep(poll_seconds)
        records[role] = {"path": str(folder), **json.loads(marker.read_text())}
    return records


__all__ = ["FINETUNE_FILE", "CleanData", "finetune_models", "finetune_role", "load_clean_data"]
