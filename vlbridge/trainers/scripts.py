"""Pieces the example scripts share: YAML presets with command-line overrides, and the built-in SFT setup."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .freezing import FREEZE_STAGES


# Mirrors `vlbridge.cli.TINY_BRIDGES`, which imports torch; kept here as names so the dataclass below stays light.
BRIDGES = ("mlp", "perceiver", "qformer")


def parse_with_preset(parser, argv: list[str]):
    """
    `parser.parse_args_into_dataclasses(argv)`, where `--config preset.yaml` gives defaults and every other flag
    overrides them (TRL's `TrlParser` behaviour).

    Args:
        parser ([`~transformers.HfArgumentParser`]): The script's parser.
        argv (`list[str]`): The command line, without the program name.

    Example:

    ```python
    >>> from dataclasses import dataclass
    >>> from transformers import HfArgumentParser
    >>> from vlbridge.trainers.scripts import parse_with_preset
    >>> @dataclass
    ... class Args:
    ...     steps: int = 1
    >>> parse_with_preset(HfArgumentParser(Args), ["--steps", "3"])
    (Args(steps=3),)
    ```
    """
    import yaml

    if "--config" in argv:
        at = argv.index("--config")
        preset = yaml.safe_load(Path(argv[at + 1]).read_text()) or {}
        # A YAML null cannot go through the command line ("--max_length=None" is no int): set it as a default.
        parser.set_defaults(**{key: value for key, value in preset.items() if value is None})
        argv = [f"--{key}={value}" for key, value in preset.items() if value is not None] + argv[:at] + argv[at + 2 :]
    return parser.parse_args_into_dataclasses(argv)


@dataclass
class ChatDataArguments:
    """The built-in chat data of the SFT examples (`vlbridge.data.make_synthetic_chat`)."""

    num_train_images: int = field(default=500, metadata={"help": "Built-in chats: training images (one chat each)."})
    image_size: int = field(default=32, metadata={"help": "Side of the built-in images."})
    max_turns: int = field(default=2, metadata={"help": "Built-in chats: most question-answer turns per chat."})
    max_objects: int = field(default=2, metadata={"help": "Built-in chats: most objects per scene (1 to 9)."})
    data_seed_value: int = field(default=0, metadata={"help": "Seed of the built-in data."})


@dataclass
class VLMModelArguments:
    """Which VLM the examples train: a saved checkpoint, or the tiny `vlbridge demo` VLM built in code."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved vlbridge checkpoint with its processor; unset builds a tiny VLM."}
    )
    bridge: str = field(
        default="qformer", metadata={"help": "Bridge of the tiny VLM built in code.", "choices": list(BRIDGES)}
    )
    freeze: str = field(
        default="finetune", metadata={"help": "What trains (FREEZE_STAGES).", "choices": sorted(FREEZE_STAGES)}
    )


def load_model_and_processor(args: VLMModelArguments, vocabulary: list[str]):
    """The checkpoint at `args.model_name_or_path` with its processor, or the `vlbridge demo` VLM with a word-level
    tokenizer over `vocabulary`; frozen as `args.freeze` says."""
    from transformers import AutoProcessor, CLIPImageProcessor

    from ..cli import _tiny_vlm
    from ..data import build_word_tokenizer
    from ..modeling import BridgeVLMForConditionalGeneration
    from ..processing import BridgeProcessor

    if args.model_name_or_path is not None:
        model = BridgeVLMForConditionalGeneration.from_pretrained(args.model_name_or_path)
        processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    else:
        tokenizer = build_word_tokenizer(vocabulary)
        model = _tiny_vlm(args.bridge, tokenizer)
        size = model.config.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor = BridgeProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)
    model.freeze(args.freeze)
    return model, processor


def builtin_chat_dataset(args: ChatDataArguments):
    """Training chats (`messages` + `images` columns only, the columns TRL's SFTTrainer keeps)."""
    from ..data import make_synthetic_chat

    data = make_synthetic_chat(
        {"train": args.num_train_images}, image_size=args.image_size, seed=args.data_seed_value,
        turns=(1, args.max_turns), max_objects=args.max_objects,
    )  # fmt: skip
    return data["train"].select_columns(["messages", "images"])


def finish_training(trainer, result, processor, output_dir: str) -> dict:
    """Save the model (on every process, which FSDP needs) and the processor, print and return the losses."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {"train_loss": result.training_loss, "final_loss": losses[-1] if losses else math.nan}
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        print(f"final train loss {metrics['final_loss']:.4f} (mean over the run {metrics['train_loss']:.4f})")
    return metrics


def train_language_model_on_text(model, tokenizer, texts: list[str], args) -> float:
    """
    Trains the VLM's language model (and its head) alone on plain text, no images, with the HF `Trainer`: BLIP-2's
    stage 2 expects an LM that already speaks the captions' language, and the tiny LM built in code does not.

    Args:
        model ([`BridgeVLMForConditionalGeneration`]): Its `language_model` and `lm_head` train; nothing else does.
        tokenizer ([`PreTrainedTokenizerBase`]): Adds BOS / EOS as the model's captions have them.
        texts (`list[str]`): The text (e.g. every training caption).
        args ([`~transformers.TrainingArguments`]): The run (`max_steps`, `learning_rate`, batch size, ...).

    Returns:
        `float`: The mean training loss of the last logged steps.
    """
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer

    eos = tokenizer.eos_token or ""
    data = Dataset.from_dict({"text": [f"{text} {eos}".strip() for text in texts]})
    data = data.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    frozen_vision_tower = getattr(model, "_frozen_vision_tower", False)
    model.freeze("language-model")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    # Back to the freezing the caller chose (whatever stage, or none, set it).
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable[name])
    model._frozen_vision_tower = frozen_vision_tower
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return sum(losses[-3:]) / max(len(losses[-3:]), 1)
