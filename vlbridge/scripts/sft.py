"""
Supervised fine-tuning of a bridged VLM with the HF Trainer and `ChatCollator`, on the built-in chat data. The script
behind `vlbridge sft` and `examples/sft.py`.

    # built-in chats, a tiny VLM built in code (a few minutes on 2 CPU cores)
    vlbridge sft --config sft_builtin
    # start from a saved vlbridge checkpoint (model + processor), e.g. a stage-2 model; score held-out VQA
    vlbridge sft --config sft_builtin --model_name_or_path outputs/my-vlm --num_eval_images 50
    # from the frozen vision tower's cached features (vlbridge cache-features --kind chats, docs/feature_cache.md)
    vlbridge sft --config sft_builtin --model_name_or_path outputs/my-vlm --vision_features outputs/my-vlm-features
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from ..data import chat_vocabulary, make_synthetic_vqa
from ..evaluation import evaluate_generation
from ..hub.checkpoint import describe_train_data
from ..modeling.saving import write_model_card
from ..trainers import ChatCollator
from ..trainers.distributed import close_process_group
from .utils import (
    ChatDataArguments,
    ScriptParser,
    ScriptResult,
    VisionFeaturesArguments,
    VLMModelArguments,
    builtin_chat_dataset,
    finish_training,
    load_model_and_processor,
    load_vision_features,
)


@dataclass
class SFTScriptArguments(VisionFeaturesArguments, ChatDataArguments):
    """The script's arguments: the chat data (`ChatDataArguments`), how `ChatCollator` cuts sequences, and
    optionally a cache of the frozen vision tower's features (`VisionFeaturesArguments`)."""

    max_length: int | None = field(default=None, metadata={"help": "Longest sequence in tokens; None never cuts."})


def make_parser() -> ScriptParser:
    """
    The script's command line: [`SFTScriptArguments`], `TrainingArguments` and `VLMModelArguments`.

    Example:

    ```python
    >>> from vlbridge.scripts.sft import make_parser
    >>> argv = ["--config", "sft_builtin", "--max_steps", "7"]
    >>> script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    >>> script_args.num_train_images, model_args.freeze, script_args.max_length, training_args.max_steps
    (500, 'finetune', None, 7)
    ```
    """
    return ScriptParser((SFTScriptArguments, TrainingArguments, VLMModelArguments))


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


def main(
    script_args: SFTScriptArguments, training_args: TrainingArguments, model_args: VLMModelArguments
) -> ScriptResult:
    """
    Runs the script on the parsed arguments (what [`make_parser`] returns, in that order).

    Returns:
        [`~vlbridge.scripts.utils.ScriptResult`]: the metrics, the checkpoint folder and the training log.

    Example:

    ```python
    >>> from vlbridge.scripts.sft import main, make_parser
    >>> argv = ["--config", "sft_builtin", "--max_steps", "20"]
    >>> result = main(*make_parser().parse_args_and_config(argv))  # doctest: +SKIP
    >>> result.metrics, result.output_dir, result.log_history[-1]  # doctest: +SKIP
    ```
    """
    data_args = collator_args = script_args

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, chat_vocabulary())
    train = builtin_chat_dataset(data_args)
    # The collator renders the chat template and masks all but the assistant's answers; it reads the raw columns,
    # so the Trainer must keep them (remove_unused_columns=False).
    cache = load_vision_features(script_args.vision_features, model, processor.image_processor)
    collator = ChatCollator.from_model(model, processor, max_length=collator_args.max_length, vision_features=cache)
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
    return ScriptResult(metrics, training_args.output_dir, log_history)


__all__ = ["SFTScriptArguments", "evaluate_vqa", "main", "make_parser"]


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
