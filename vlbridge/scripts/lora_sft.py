"""
Safety / helpfulness LoRA SFT of a bridged VLM with TRL's `SFTTrainer`, on built-in chats that answer questions
about the image and decline to describe objects it does not hold: the script behind `vlbridge lora_sft`
and `examples/lora_sft.py` (whose docstring explains the data and the arguments).

    vlbridge lora_sft --config sft_trl_builtin --model_name_or_path outputs/sft-trl-builtin \
        --output_dir outputs/lora-sft-safety --max_steps 200 --learning_rate 0.01
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from ..data import make_synthetic_preference, make_synthetic_safety_chat, preference_vocabulary
from ..data.user import load_user_dataset
from ..evaluation import preference_accuracy
from ..trainers.distributed import close_process_group
from ..trainers.lora import LoraArguments
from .dpo import print_preference_accuracy, save_merged
from .utils import (
    ChatDataArguments,
    ScriptParser,
    ScriptResult,
    VLMModelArguments,
    check_decoder_only_language_model,
    load_model_and_processor,
)


@dataclass
class SafetyDataArguments:
    """What the safety chats add to the built-in chat data arguments."""

    refusal_rate: float = field(default=0.3, metadata={"help": "Share of turns about an absent object (refused)."})
    caption_rate: float = field(
        default=0.0, metadata={"help": "Share of the other turns that ask for the full description (keeps captions)."}
    )
    num_preference_images: int = field(default=100, metadata={"help": "Held-out images of the preference pairs."})


@dataclass
class LoraSFTScriptArguments(SafetyDataArguments, ChatDataArguments, LoraArguments):
    """The script's arguments: the chat data (`ChatDataArguments`), what the safety chats add
    ([`SafetyDataArguments`]) and the LoRA adapters ([`~vlbridge.trainers.LoraArguments`])."""


def make_parser() -> ScriptParser:
    """The script's command line: [`LoraSFTScriptArguments`], TRL's `SFTConfig` and `VLMModelArguments`."""
    return ScriptParser((LoraSFTScriptArguments, SFTConfig, VLMModelArguments))


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


def main(script_args: LoraSFTScriptArguments, training_args: SFTConfig, model_args: VLMModelArguments) -> ScriptResult:
    """
    Runs the script on the parsed arguments (what [`make_parser`] returns, in that order).

    Returns:
        [`~vlbridge.scripts.utils.ScriptResult`]: the metrics, the merged model's folder and the training log.

    Example:

    ```python
    >>> from vlbridge.scripts.lora_sft import main, make_parser
    >>> argv = ["--config", "lora_sft_builtin", "--max_steps", "20"]
    >>> result = main(*make_parser().parse_args_and_config(argv))  # doctest: +SKIP
    >>> result.metrics, result.output_dir, result.log_history[-1]  # doctest: +SKIP
    ```
    """
    data_args = safety_args = lora_args = script_args
    if (model_args.model_name_or_path or "none").lower() in ("none", "null", ""):
        model_args.model_name_or_path = None

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, preference_vocabulary())
    check_decoder_only_language_model(model, "SFT")  # before TRL, which fails deep inside an encoder-decoder
    train, held_out = safety_data(data_args, safety_args)
    if data_args.dataset != "builtin":  # the user's chats; the held-out pairs stay the built-in ones
        command = "vlbridge lora_sft"
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
    return ScriptResult(metrics, merged, log_history)


__all__ = ["LoraSFTScriptArguments", "SafetyDataArguments", "main", "make_parser", "safety_data"]


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
