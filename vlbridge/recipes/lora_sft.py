"""
Safety / helpfulness LoRA SFT of a bridged VLM with TRL's `SFTTrainer`, on built-in chats that answer questions
about the image and decline to describe objects it does not hold: the recipe behind `vlbridge train --stage lora-sft`
and `examples/lora_sft.py` (whose docstring explains the data and the arguments).

    vlbridge train --stage lora-sft --config sft_trl_builtin --model_name_or_path outputs/sft-trl-builtin \
        --output_dir outputs/lora-sft-safety --max_steps 200 --learning_rate 0.01
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer

from ..data import make_synthetic_preference, make_synthetic_safety_chat, preference_vocabulary
from ..trainers import preference_accuracy
from ..trainers.distributed import close_process_group
from ..trainers.lora import LoraArguments
from ..trainers.scripts import (
    ChatDataArguments,
    VLMModelArguments,
    check_decoder_only_language_model,
    load_model_and_processor,
    load_user_dataset,
    parse_with_preset,
)
from .common import RecipeResult
from .dpo import print_preference_accuracy, save_merged


@dataclass
class SafetyDataArguments:
    """What the safety chats add to the built-in chat data arguments."""

    refusal_rate: float = field(default=0.3, metadata={"help": "Share of turns about an absent object (refused)."})
    caption_rate: float = field(
        default=0.0, metadata={"help": "Share of the other turns that ask for the full description (keeps captions)."}
    )
    num_preference_images: int = field(default=100, metadata={"help": "Held-out images of the preference pairs."})


def build_parser() -> HfArgumentParser:
    """The recipe's command line: `ChatDataArguments`, [`SafetyDataArguments`], `LoraArguments`,
    `VLMModelArguments` and TRL's `SFTConfig`."""
    return HfArgumentParser((ChatDataArguments, SafetyDataArguments, LoraArguments, VLMModelArguments, SFTConfig))


def safety_data(data_args: ChatDataArguments, safety_args: SafetyDataArguments):
    """The training chats (`messages` + `images`) and the held-out refusal and question preference pairs."""
    options = {"image_size": data_args.image_size, "seed": data_args.data_seed_value}
    options["max_objects"] = data_args.max_objects
    splits = {"train": data_args.num_train_images, "test": safety_args.num_preference_images}
    chats = make_synthetic_safety_chat(
        splits,
        turns=data_args.max_turns,
        refusal_rate=safety_args.refusal_rate,
        caption_rate=safety_args.caption_rate,
        **options,
    )
    # `present` pairs (a true answer over a denial) catch a model that has learnt to refuse everything.
    held_out = make_synthetic_preference(
        splits, pair_types=["absent", "present", "question"], pairs_per_image=1, **options
    )
    # The same held-out scenes as the chats' "test" split, which no training sees.
    return chats["train"].select_columns(["messages", "images"]), held_out["test"]


def run(argv: list[str] | None = None, parser: HfArgumentParser | None = None) -> RecipeResult:
    """
    Runs the recipe: `argv` is the command line (default `sys.argv[1:]`), `parser` a customised [`build_parser`].

    Returns:
        [`~vlbridge.recipes.common.RecipeResult`]: the metrics, the merged model's folder and the training log.

    Example:

    ```python
    >>> from vlbridge.recipes.lora_sft import run
    >>> argv = ["--config", "sft_trl_builtin", "--model_name_or_path", "outputs/sft", "--max_steps", "50"]
    >>> result = run(argv)  # doctest: +SKIP
    >>> result.metrics, result.output_dir, result.log_history[-1]  # doctest: +SKIP
    ```
    """
    argv = sys.argv[1:] if argv is None else argv
    data_args, safety_args, lora_args, model_args, training_args = parse_with_preset(parser or build_parser(), argv)
    if (model_args.model_name_or_path or "none").lower() in ("none", "null", ""):
        model_args.model_name_or_path = None

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, preference_vocabulary())
    check_decoder_only_language_model(model, "SFT")  # before TRL, which fails deep inside an encoder-decoder
    train, held_out = safety_data(data_args, safety_args)
    if data_args.dataset != "builtin":  # the user's chats; the held-out pairs stay the built-in ones
        command = "vlbridge train --stage lora-sft"
        train = load_user_dataset(data_args.dataset, "chats", command, data_args.allow_outside_paths)
        train = train.select_columns(["messages", "images"])
    before = preference_accuracy(model, processor, held_out, group_by="pair_type")

    ################
    # Training & save
    ################
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=processor,
        peft_config=lora_args.lora_config(model),
    )
    result = trainer.train()
    after = preference_accuracy(trainer.model, processor, held_out, group_by="pair_type")
    trainer.save_model(os.path.join(training_args.output_dir, "adapter"))
    metrics = {"train_loss": result.training_loss, "accuracy_before": before["accuracy"]}
    metrics.update({f"accuracy_after_{kind}": group["accuracy"] for kind, group in after["groups"].items()})
    metrics["accuracy_after"] = after["accuracy"]
    merged = os.path.join(training_args.output_dir, "merged")
    if trainer.is_world_process_zero():
        save_merged(trainer, processor, merged, metrics, stage="sft")
        print(f"train loss {result.training_loss:.4f}")
        print_preference_accuracy(before, after, with_margin=False)
    log_history = list(trainer.state.log_history)
    del trainer, model
    close_process_group()
    return RecipeResult(metrics, merged, log_history)


def main(argv: list[str] | None = None) -> dict:
    """Runs the recipe on `argv` (default `sys.argv[1:]`) and returns its metrics."""
    return run(argv).metrics


__all__ = ["SafetyDataArguments", "build_parser", "main", "run"]
