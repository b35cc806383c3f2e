"""
DPO with LoRA of a bridged VLM with TRL's `DPOTrainer`, on the built-in preference pairs against hallucination: the
script behind `vlbridge dpo` and `examples/dpo.py` (whose docstring explains the pairs and the DPOConfig settings a
VLM needs).

    # from the SFT checkpoint the preset names (outputs/sft-trl-builtin)
    vlbridge dpo --config dpo_builtin
    # a short smoke run on a tiny VLM built in code
    vlbridge dpo --config dpo_builtin --model_name_or_path none --max_steps 5

It prints the held-out preference accuracy before and after, overall and per pair type, and how often greedy
generation gives the chosen answer (a run can win log-prob margins and still break generation), then saves the adapter
(`<output_dir>/adapter`) and the merged model with its processor and model card (`<output_dir>/merged`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import DPOConfig, DPOTrainer

from ..data import make_synthetic_image_text, make_synthetic_preference, preference_vocabulary
from ..data.synthetic import Scene, describe_positions
from ..data.user import load_user_dataset
from ..evaluation import preference_accuracy, preference_answer_accuracy
from ..hub.checkpoint import describe_checkpoint, describe_train_data
from ..trainers.distributed import close_process_group
from ..trainers.lora import LoraArguments
from .utils import (
    OUTSIDE_PATHS_HELP,
    ScriptParser,
    ScriptResult,
    VLMModelArguments,
    check_decoder_only_language_model,
    dataset_help,
    load_model_and_processor,
)


@dataclass
class PreferenceDataArguments:
    """The preference pairs: built-in (`vlbridge.data.make_synthetic_preference`) or `--dataset`; the held-out pairs
    are always built-in."""

    dataset: str = field(default="builtin", metadata={"help": dataset_help("preferences")})
    allow_outside_paths: bool = field(default=False, metadata={"help": OUTSIDE_PATHS_HELP})
    num_train_images: int = field(default=500, metadata={"help": "Images of the training pairs."})
    num_eval_images: int = field(default=100, metadata={"help": "Held-out images (scenes no training saw)."})
    pairs_per_image: int = field(default=2, metadata={"help": "Preference pairs per image."})
    pair_types: str = field(
        default="caption,question,absent,present",
        metadata={"help": "Comma-separated, among caption, question, absent, present."},
    )
    image_size: int = field(default=32, metadata={"help": "Side of the images (as in the SFT run)."})
    max_objects: int = field(default=2, metadata={"help": "Most objects per scene (as in the SFT run)."})
    data_seed_value: int = field(default=0, metadata={"help": "Seed of the built-in data (as in the SFT run)."})
    sft_num_train_images: int = field(
        default=500, metadata={"help": "Training chats of the SFT run (their scenes are kept out of the held-out)."}
    )


def held_out_pairs(data_args: PreferenceDataArguments):
    """Training pairs, and held-out pairs on scenes that neither the SFT chats nor the training pairs show."""
    options = {"image_size": data_args.image_size, "seed": data_args.data_seed_value}
    options["max_objects"] = data_args.max_objects
    splits = {"train": data_args.num_train_images, "test": data_args.num_eval_images}
    data = make_synthetic_preference(
        splits, pairs_per_image=data_args.pairs_per_image, pair_types=data_args.pair_types.split(","), **options
    )
    held_out = data["test"]
    if data_args.sft_num_train_images:
        # The SFT chats (`builtin_chat_dataset`) were drawn without this held-out split: drop the scenes they share.
        sft = make_synthetic_image_text({"train": data_args.sft_num_train_images}, **options)  # same draws as SFT
        seen = {describe_positions(Scene.from_objects(objects)) for objects in sft["train"]["objects"]}
        keep = [
            i
            for i, objects in enumerate(held_out["objects"])
            if describe_positions(Scene.from_objects(objects)) not in seen
        ]
        held_out = held_out.select(keep)
    return data["train"].select_columns(["images", "prompt", "chosen", "rejected"]), held_out


@dataclass
class DPOScriptArguments(PreferenceDataArguments, LoraArguments):
    """The script's arguments: the preference pairs ([`PreferenceDataArguments`]) and the LoRA adapters
    ([`~vlbridge.trainers.LoraArguments`])."""


def make_parser() -> ScriptParser:
    """The script's command line: [`DPOScriptArguments`], TRL's `DPOConfig` and `VLMModelArguments`."""
    return ScriptParser((DPOScriptArguments, DPOConfig, VLMModelArguments))


def preference_metrics(before: dict, after: dict, answers: tuple[dict, dict]) -> dict:
    """The run's metrics from [`~vlbridge.evaluation.preference_accuracy`] before and after training, and from
    [`~vlbridge.evaluation.preference_answer_accuracy`] (`answers`: before, after)."""
    metrics = {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"]}
    metrics.update(margin_before=before["margin"], margin_after=after["margin"], held_out_pairs=after["num_pairs"])
    metrics.update({f"accuracy_after_{kind}": group["accuracy"] for kind, group in after["groups"].items()})
    metrics.update(answer_accuracy_before=answers[0]["accuracy"], answer_accuracy_after=answers[1]["accuracy"])
    return metrics


def save_merged(trainer, processor, directory: str, metrics: dict, stage: str = "dpo") -> None:
    """The adapters merged into a plain vlbridge checkpoint, with its processor, `auto_map` and model card."""
    merged = trainer.model.merge_and_unload()  # a plain BridgeVLMForConditionalGeneration
    merged.save_pretrained(directory)
    processor.save_pretrained(directory)
    describe_checkpoint(directory, stage=stage, data=describe_train_data(trainer.train_dataset), metrics=metrics)


def print_preference_accuracy(
    before: dict, after: dict, with_margin: bool = True, title: str = "held-out preference accuracy"
) -> None:
    """One line per pair type (and `all`): held-out preference accuracy (or another `title`) before -> after."""
    for name in ["all", *before["groups"]]:
        start, end = (before, after) if name == "all" else (before["groups"][name], after["groups"][name])
        line = f"{title} [{name}] {start['accuracy']:.3f} -> {end['accuracy']:.3f}"
        if with_margin:
            line += f" (mean log-prob margin {start['margin']:.2f} -> {end['margin']:.2f}, {end['num_pairs']} pairs)"
        print(line)


def main(script_args: DPOScriptArguments, training_args: DPOConfig, model_args: VLMModelArguments) -> ScriptResult:
    """
    Runs the script on the parsed arguments (what [`make_parser`] returns, in that order).

    Returns:
        [`~vlbridge.scripts.utils.ScriptResult`]: the metrics, the merged model's folder and the training log.

    Example:

    ```python
    >>> from vlbridge.scripts.dpo import main, make_parser
    >>> argv = ["--config", "dpo_builtin", "--model_name_or_path", "outputs/sft", "--max_steps", "50"]
    >>> result = main(*make_parser().parse_args_and_config(argv))  # doctest: +SKIP
    >>> result.metrics, result.output_dir, result.log_history[-1]  # doctest: +SKIP
    ```
    """
    data_args = lora_args = script_args
    if (model_args.model_name_or_path or "none").lower() in ("none", "null", ""):
        model_args.model_name_or_path = None

    ################
    # Model, processor & data
    ################
    model, processor = load_model_and_processor(model_args, preference_vocabulary())
    check_decoder_only_language_model(model, "DPO")  # before TRL, which fails deep inside an encoder-decoder
    train, held_out = held_out_pairs(data_args)
    if data_args.dataset != "builtin":
        train = load_user_dataset(data_args.dataset, "preferences", "vlbridge dpo", data_args.allow_outside_paths)
        train = train.select_columns(["images", "prompt", "chosen", "rejected"])
    before = preference_accuracy(model, processor, held_out, group_by="pair_type")
    # What the model says, not only which answer it scores higher: DPO can win margins while breaking generation.
    answers_before = preference_answer_accuracy(model, processor, held_out, group_by="pair_type")

    ################
    # Training
    ################
    peft_config = lora_args.lora_config(model)  # LoRA on the language model only (language_model_lora_config)
    # No ref_model: with a PEFT model, TRL scores the reference with the adapters disabled (the starting model).
    trainer = DPOTrainer(
        model=model, args=training_args, train_dataset=train, processing_class=processor, peft_config=peft_config
    )
    trainer.train()
    after = preference_accuracy(trainer.model, processor, held_out, group_by="pair_type")
    answers_after = preference_answer_accuracy(trainer.model, processor, held_out, group_by="pair_type")

    ################
    # Save: the adapter (with the trained bridge copies), then the merged model
    ################
    output_dir = training_args.output_dir
    trainer.save_model(os.path.join(output_dir, "adapter"))  # adapter_config.json + adapter_model.safetensors
    metrics = preference_metrics(before, after, (answers_before, answers_after))
    if trainer.is_world_process_zero():
        save_merged(trainer, processor, os.path.join(output_dir, "merged"), metrics)
        print_preference_accuracy(before, after)
        print_preference_accuracy(answers_before, answers_after, with_margin=False, title="held-out answers = chosen")
    log_history = list(trainer.state.log_history)
    del trainer, model
    close_process_group()
    return ScriptResult(metrics, os.path.join(output_dir, "merged"), log_history)


__all__ = ["DPOScriptArguments", "PreferenceDataArguments", "held_out_pairs", "main", "make_parser"]


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
