"""
Supervised fine-tuning of a bridged VLM with the HF Trainer and `ChatCollator`, on the built-in chat data. The recipe
behind `vlbridge train --stage sft` and `examples/sft.py`.

    # built-in chats, a tiny VLM built in code (a few minutes on 2 CPU cores)
    vlbridge train --stage sft --config sft_builtin
    # start from a saved vlbridge checkpoint (model + processor), e.g. a stage-2 model; score held-out VQA
    vlbridge train --stage sft --config sft_builtin --model_name_or_path outputs/my-vlm --num_eval_images 50
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, Trainer, TrainingArguments

from ..data import chat_vocabulary, make_synthetic_vqa
from ..modeling.hub import write_model_card
from ..trainers import ChatCollator, evaluate_generation
from ..trainers.distributed import close_process_group
from ..trainers.scripts import (
    ChatDataArguments,
    VLMModelArguments,
    builtin_chat_dataset,
    describe_train_data,
    finish_training,
    load_model_and_processor,
    parse_with_preset,
)
from .common import RecipeResult


@dataclass
class CollatorArguments:
    """How `ChatCollator` cuts sequences."""

    max_length: int | None = field(default=None, metadata={"help": "Longest sequence in tokens; None never cuts."})


def build_parser() -> HfArgumentParser:
    """
    The recipe's command line: `ChatDataArguments`, `VLMModelArguments`, [`CollatorArguments`] and
    `TrainingArguments`.

    Example:

    ```python
    >>> from vlbridge.recipes.sft import build_parser
    >>> from vlbridge.trainers.scripts import parse_with_preset
    >>> argv = ["--config", "sft_builtin", "--max_steps", "7"]
    >>> data, model, collator, training = parse_with_preset(build_parser(), argv)
    >>> data.num_train_images, model.freeze, collator.max_length, training.max_steps
    (500, 'finetune', None, 7)
    ```
    """
    return HfArgumentParser((ChatDataArguments, VLMModelArguments, CollatorArguments, TrainingArguments))


def evaluate_vqa(model, processor, train, data_args: ChatDataArguments, training_args, metrics: dict) -> None:
    """Held-out VQA accuracy (overall and per question type) into `metrics`, printed and written into the card."""
    # The test split's scenes come from their own random stream, apart from the training chats'.
    questions = make_synthetic_vqa(
        {"test": data_args.num_eval_images},
        image_size=data_args.image_size,
        seed=data_args.data_seed_value,
        max_objects=data_args.max_objects,
    )["test"]
    scores = evaluate_generation(
        model, processor, questions, task="vqa", max_new_tokens=8, progress=not training_args.disable_tqdm
    )
    metrics["vqa_accuracy"] = scores["vqa_accuracy"]
    print(f"held-out VQA ({scores['num_examples']} questions): accuracy {scores['vqa_accuracy']:.3f}")
    for kind, accuracy in sorted(scores.get("vqa_accuracy_per_type", {}).items()):
        print(f"  {kind}: {accuracy:.3f}")
    write_model_card(training_args.output_dir, stage="sft", metrics=metrics, data=describe_train_data(train))


def run(argv: list[str] | None = None, parser: HfArgumentParser | None = None) -> RecipeResult:
    """
    Runs the recipe: `argv` is the command line (default `sys.argv[1:]`), `parser` a customised [`build_parser`].

    Returns:
        [`~vlbridge.recipes.common.RecipeResult`]: the metrics, the checkpoint folder and the training log.

    Example:

    ```python
    >>> from vlbridge.recipes.sft import run
    >>> argv = ["--config", "sft_builtin", "--model_name_or_path", "outputs/stage2", "--num_eval_images", "50"]
    >>> result = run(argv)  # doctest: +SKIP
    >>> result.metrics, result.output_dir, result.log_history[-1]  # doctest: +SKIP
    ```
    """
    data_args, model_args, collator_args, training_args = parse_with_preset(
        parser or build_parser(), sys.argv[1:] if argv is None else argv
    )

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, chat_vocabulary())
    train = builtin_chat_dataset(data_args)
    # The collator renders the chat template and masks all but the assistant's answers; it reads the raw columns,
    # so the Trainer must keep them (remove_unused_columns=False).
    collator = ChatCollator.from_model(model, processor, max_length=collator_args.max_length)
    training_args.remove_unused_columns = False

    ################
    # Training & save
    ################
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
    metrics = finish_training(trainer, trainer.train(), processor, training_args.output_dir)

    ################
    # Held-out VQA
    ################
    if data_args.num_eval_images > 0 and trainer.is_world_process_zero():
        evaluate_vqa(trainer.model, processor, train, data_args, training_args, metrics)
    log_history = list(trainer.state.log_history)
    # Under accelerate / torchrun: every process waits here for the others, then the process group closes cleanly.
    del trainer, model
    close_process_group()
    return RecipeResult(metrics, training_args.output_dir, log_history)


def main(argv: list[str] | None = None) -> dict:
    """Runs the recipe on `argv` (default `sys.argv[1:]`) and returns its metrics."""
    return run(argv).metrics


__all__ = ["CollatorArguments", "build_parser", "main", "run"]
