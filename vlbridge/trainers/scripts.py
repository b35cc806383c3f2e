"""Pieces the example scripts share: YAML presets with command-line overrides, and the built-in SFT setup."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..modeling.freezing import FREEZE_STAGES


# Mirrors `vlbridge.recipes.tiny.TINY_BRIDGES`, whose module imports the configs; names only keep this one light.
BRIDGES = ("mlp", "perceiver", "qformer")


def parse_with_preset(parser, argv: list[str]):
    """
    `parser.parse_args_into_dataclasses(argv)`, where `--config preset.yaml` gives defaults and every other flag
    overrides them (TRL's `TrlParser` behaviour). `--config` takes a path or the name of a preset shipped with
    vlbridge (`--config sft_builtin`, see [`~vlbridge.recipes.common.resolve_preset`]). When the arguments hold a
    `seed` (TrainingArguments), `transformers.set_seed(seed)` runs before returning, so that the models the recipe
    builds next are the same on every run.

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

    from ..recipes.common import resolve_preset

    argv = list(argv)
    for at, arg in enumerate(argv):
        if arg.startswith("--config="):
            argv[at : at + 1] = ["--config", arg.split("=", 1)[1]]
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 == len(argv):
            parser.error("--config needs a YAML file or a preset name.")
        preset = yaml.safe_load(resolve_preset(argv[at + 1]).read_text()) or {}
        # A YAML null cannot go through the command line ("--max_length=None" is no int): set it as a default.
        parser.set_defaults(**{key: value for key, value in preset.items() if value is None})
        flags = []
        for key, value in preset.items():
            if isinstance(value, list):  # a list field (`loss_type: [sigmoid, sft]`) takes its values one by one
                flags += [f"--{key}", *map(str, value)]
            elif value is not None:
                flags.append(f"--{key}={value}")
        argv = flags + argv[:at] + argv[at + 2 :]
    parsed = parser.parse_args_into_dataclasses(argv)
    # The recipes build their models before the Trainer seeds itself: seed now, or a recipe run is not repeatable.
    seeds = [args.seed for args in parsed if isinstance(getattr(args, "seed", None), int)]
    if seeds:
        from transformers import set_seed

        set_seed(seeds[-1])
    return parsed


# What each kind of `--dataset` holds, in the words of `--help` and of the error a dataset of another kind gets.
DATASET_COLUMNS = {
    "captions": ("image", "caption"),
    "chats": ("images", "messages"),
    "preferences": ("images", "prompt", "chosen", "rejected"),
}
DATASET_FORMATS = {
    "captions": 'a folder of images with a metadata.jsonl ({"file_name": "1.png", "text": "a red circle"} per '
    'line), a .jsonl of {"image": "1.png", "caption": "..."} lines, or .tar shards (a path or a brace pattern)',
    "chats": 'a folder with a metadata.jsonl, a .jsonl or .tar shards whose rows hold a chat: {"images": ["1.png"], '
    '"messages": [{"role": "user", "content": "<image> what is it?"}, {"role": "assistant", "content": "..."}]}',
    "preferences": 'a .jsonl of preference rows as TRL\'s DPOTrainer takes them: {"images": ["1.png"], "prompt": '
    '"<image> what is it?", "chosen": "a red circle", "rejected": "a blue star"} (strings, or lists of chat '
    "messages); image paths are relative to the file",
}


OUTSIDE_PATHS_HELP = (
    "Accept --dataset image paths that leave the dataset's folder (absolute paths elsewhere, or '..'); refused by "
    "default, since a metadata file could otherwise read any file on the machine."
)


def dataset_help(kind: str) -> str:
    """The `--dataset` help of a command that trains on `kind` (`"captions"`, `"chats"` or `"preferences"`)."""
    return f"'builtin' (the built-in synthetic data), or your own {kind}: {DATASET_FORMATS[kind]}."


def _peek_jsonl(path: Path) -> dict:
    """The first record of a jsonl file (empty if none)."""
    import json

    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                return record if isinstance(record, dict) else {}
    return {}


def _preference_messages(value, role: str, num_images: int, where: str) -> list[dict]:
    """A prompt / answer as a list of chat messages: strings become one `role` turn, with the prompt's images."""
    from ..data import normalize_messages

    if isinstance(value, str):
        text = value.replace("<image>", "").strip()
        content = [{"type": "image"}] * (num_images if role == "user" else 0) + [{"type": "text", "text": text}]
        return [{"role": role, "content": content}]
    if isinstance(value, list):
        return normalize_messages(value)
    raise ValueError(f"{where}: expected a string or a list of chat messages, got {type(value).__name__}.")


def load_preference_jsonl(path: str | os.PathLike, allow_outside_paths: bool = False):
    """
    A jsonl of preference rows (`images` or `image`, `prompt`, `chosen`, `rejected`) as a `datasets.Dataset` in the
    conversational format TRL's `DPOTrainer` takes: image paths (absolute or relative to the file) become
    `datasets.Image()` values, a string prompt becomes a user turn holding the images, a string answer an assistant
    turn. A missing image raises `FileNotFoundError` naming it: a DPO pair without its image teaches nothing.

    Args:
        path (`str` or `os.PathLike`): The jsonl file.
        allow_outside_paths (`bool`, *optional*, defaults to `False`): Accept image paths that leave the file's
            folder (absolute elsewhere, or `..`), as the caption and chat loaders do.

    Returns:
        `datasets.Dataset` with columns `images`, `prompt`, `chosen`, `rejected`.
    """
    import json

    from datasets import Dataset, Image, List

    from ..data.local import check_paths_inside

    source = Path(path)
    rows = []
    with open(source, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record, where = json.loads(line), f"{source}, line {number}"
            missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
            if missing:
                raise ValueError(f"{where} has no {', '.join(missing)}: {DATASET_FORMATS['preferences']}.")
            images = record.get("images", record.get("image", []))
            images = [images] if isinstance(images, str) else list(images)
            if not allow_outside_paths:
                check_paths_inside(images, source.parent, where)
            paths = [str(Path(name) if Path(name).is_absolute() else source.parent / name) for name in images]
            for name, file in zip(images, paths):
                if not Path(file).is_file():
                    raise FileNotFoundError(f"{where}: image {name!r} not found (looked for {file}).")
            rows.append(
                {
                    "images": paths,
                    "prompt": _preference_messages(record["prompt"], "user", len(paths), where),
                    "chosen": _preference_messages(record["chosen"], "assistant", 0, where),
                    "rejected": _preference_messages(record["rejected"], "assistant", 0, where),
                }
            )
    if not rows:
        raise ValueError(f"{source} holds no preference rows: {DATASET_FORMATS['preferences']}.")
    return Dataset.from_list(rows).cast_column("images", List(Image()))


def load_user_dataset(path: str | os.PathLike, kind: str, command: str, allow_outside_paths: bool = False):
    """
    A `--dataset` given on the command line, loaded as `vlbridge pretrain --dataset` loads it (a folder with a
    `metadata.jsonl`: `load_image_text_folder`; a `.jsonl`: `load_image_text_jsonl`; `.tar` shards:
    `load_image_text_shards`; a `.jsonl` of preference rows: [`load_preference_jsonl`]), and checked to be of the
    `kind` the command trains on.

    Args:
        path (`str` or `os.PathLike`): The dataset.
        kind (`str`): `"captions"`, `"chats"` or `"preferences"` (see `DATASET_COLUMNS`).
        command (`str`): The command, for the error (`"vlbridge train --stage sft"`).
        allow_outside_paths (`bool`, *optional*, defaults to `False`): Accept image paths that leave the dataset's
            folder (see `load_image_text_folder`).

    Returns:
        `datasets.Dataset` with the columns of `DATASET_COLUMNS[kind]` (and any others the loader gives).

    Raises:
        `ValueError`: One line naming the columns `command` expects, when the data is of another kind.
    """
    from ..data import load_image_text_folder, load_image_text_jsonl, load_image_text_shards

    expected = DATASET_COLUMNS[kind]
    source = Path(path)
    text = str(path)
    if source.is_dir():
        dataset = load_image_text_folder(source, allow_outside_paths=allow_outside_paths)
    elif source.suffix == ".jsonl":
        if not source.is_file():
            raise FileNotFoundError(f"--dataset {text!r} does not exist; {command} takes {DATASET_FORMATS[kind]}.")
        if {"chosen", "rejected"} & set(_peek_jsonl(source)):
            dataset = load_preference_jsonl(source, allow_outside_paths)
        elif kind == "preferences":
            raise ValueError(
                f"{command} takes preference rows (columns {', '.join(expected)}); {text} holds no `chosen` / "
                "`rejected` answers."
            )
        else:
            dataset = load_image_text_jsonl(source, allow_outside_paths=allow_outside_paths)
    elif source.suffix == ".tar" or any(mark in text for mark in "*{["):
        dataset = load_image_text_shards(text)
    else:
        raise FileNotFoundError(
            f"--dataset {text!r} is no folder, .jsonl file or .tar shard: {command} takes {DATASET_FORMATS[kind]}."
        )
    columns = list(dataset.column_names or [])
    if not set(expected) <= set(columns):
        raise ValueError(
            f"{command} takes {kind} (columns {', '.join(expected)}); {text} holds columns {', '.join(columns)}."
        )
    return dataset


def check_model_folder(path: str | os.PathLike) -> None:
    """
    Refuses, with the fix, a folder that holds a LoRA adapter (`adapter_config.json`, no `config.json`) where a full
    model is expected: loading it would fail deep inside transformers.

    Example:

    ```python
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from vlbridge.trainers.scripts import check_model_folder
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


def check_decoder_only_language_model(model, trainer: str = "SFT / DPO") -> None:
    """
    Refuses a VLM whose language model is an encoder-decoder (T5) before a TRL trainer is built: TRL's `SFTTrainer`
    and `DPOTrainer` feed one sequence through a causal LM, which an encoder-decoder cannot take (it fails deep in
    T5 with "You must specify exactly one of input_ids or inputs_embeds"). The HF Trainer recipe with `ChatCollator`
    handles both kinds.

    Args:
        model ([`BridgeVLMForConditionalGeneration`]): The model about to be trained (a PEFT wrapper is fine).
        trainer (`str`, *optional*): The trainer named in the error.

    Raises:
        `ValueError`: When the language model is an encoder-decoder.
    """
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    encoder_decoder = getattr(text_config, "is_encoder_decoder", False) or (
        getattr(config, "use_decoder_only_language_model", True) is False
    )
    if encoder_decoder:
        kind = getattr(text_config, "model_type", "encoder-decoder")
        raise ValueError(
            f"TRL's {trainer} trainers handle decoder-only language models; this model's language model is {kind} "
            "(encoder-decoder): use `vlbridge train --stage sft` (the HF Trainer) instead."
        )


@dataclass
class ChatDataArguments:
    """The chat data of the SFT recipes: the built-in chats (`vlbridge.data.make_synthetic_chat`) or `--dataset`."""

    dataset: str = field(default="builtin", metadata={"help": dataset_help("chats")})
    allow_outside_paths: bool = field(default=False, metadata={"help": OUTSIDE_PATHS_HELP})
    num_train_images: int = field(default=500, metadata={"help": "Built-in chats: training images (one chat each)."})
    image_size: int = field(default=32, metadata={"help": "Side of the built-in images."})
    max_turns: int = field(default=2, metadata={"help": "Built-in chats: most question-answer turns per chat."})
    max_objects: int = field(default=2, metadata={"help": "Built-in chats: most objects per scene (1 to 9)."})
    data_seed_value: int = field(default=0, metadata={"help": "Seed of the built-in data."})
    num_eval_images: int = field(
        default=0, metadata={"help": "Held-out images whose questions are answered after training; 0 skips."}
    )


@dataclass
class VLMModelArguments:
    """Which VLM the recipes train: a saved checkpoint, or the tiny VLM built in code (`vlbridge.recipes.tiny`)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved vlbridge checkpoint with its processor; unset builds a tiny VLM."}
    )
    bridge: str = field(
        default="qformer", metadata={"help": "Bridge of the tiny VLM built in code.", "choices": list(BRIDGES)}
    )
    freeze: str = field(
        default="finetune", metadata={"help": "What trains (FREEZE_STAGES).", "choices": sorted(FREEZE_STAGES)}
    )
    instruct_from_stage1: str | None = field(
        default=None,
        metadata={
            "help": "InstructBLIP mode: a stage-1 directory whose Q-Former text branch and tokenizer join the loaded "
            "Q-Former VLM, so that the instruction also enters the Q-Former (add_qformer_instruction_input); '' "
            "turns a preset's value off."
        },
    )


def load_model_and_processor(args: VLMModelArguments, vocabulary: list[str]):
    """The checkpoint at `args.model_name_or_path` with its processor, or the tiny VLM of `vlbridge.recipes.tiny` with
    a word-level tokenizer over `vocabulary`; frozen as `args.freeze` says."""
    from transformers import AutoProcessor, CLIPImageProcessor

    from ..data import build_word_tokenizer
    from ..modeling import BridgeVLMForConditionalGeneration
    from ..processing import BridgeProcessor
    from ..recipes.tiny import tiny_vlm

    if args.model_name_or_path is not None:
        check_model_folder(args.model_name_or_path)
        model = BridgeVLMForConditionalGeneration.from_pretrained(args.model_name_or_path)
        processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    else:
        tokenizer = build_word_tokenizer(vocabulary)
        model = tiny_vlm(args.bridge, tokenizer)
        size = model.config.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor = BridgeProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)
    if args.instruct_from_stage1:  # "" on the command line turns a preset's value off
        model, processor = _instruct_from_stage1(model, processor, args.instruct_from_stage1)
    model.freeze(args.freeze)
    return model, processor


def _instruct_from_stage1(model, processor, directory: str):
    """The model in InstructBLIP mode, and its processor with the stage-1 tokenizer as the Q-Former's."""
    from transformers import AutoTokenizer

    from ..modeling import add_qformer_instruction_input
    from ..processing import BridgeProcessor

    model = add_qformer_instruction_input(model, directory)
    processor = BridgeProcessor(
        processor.image_processor,
        processor.tokenizer,
        qformer_tokenizer=AutoTokenizer.from_pretrained(directory),
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_image_tokens=processor.num_image_tokens,
    )
    return model, processor


def builtin_chat_dataset(args: ChatDataArguments, command: str = "vlbridge train --stage sft"):
    """Training chats (`messages` + `images` columns only, the columns TRL's SFTTrainer keeps): `args.dataset`, or
    the built-in chats when it is `"builtin"`."""
    from ..data import make_synthetic_chat

    if args.dataset != "builtin":
        chats = load_user_dataset(args.dataset, "chats", command, args.allow_outside_paths)
        return chats.select_columns(["messages", "images"])

    data = make_synthetic_chat(
        {"train": args.num_train_images},
        image_size=args.image_size,
        seed=args.data_seed_value,
        turns=(1, args.max_turns),
        max_objects=args.max_objects,
    )
    return data["train"].select_columns(["messages", "images"])


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
    >>> from vlbridge.trainers.scripts import infer_stage
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
    >>> from vlbridge.trainers.scripts import describe_train_data
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


def finish_training(
    trainer,
    result,
    processor,
    output_dir: str,
    *,
    stage: str | None = None,
    data: str | None = None,
    metrics: dict | None = None,
    base_models: str | list[str] | None = None,
) -> dict:
    """
    Saves the model (on every process, which FSDP needs), its processor and chat template, the `auto_map` and a model
    card naming the stage, the data and the metrics ([`~vlbridge.modeling.hub.describe_checkpoint`]); prints and
    returns the losses.

    Args:
        trainer ([`~transformers.Trainer`]): The trainer that has trained.
        result ([`~transformers.trainer_utils.TrainOutput`]): What `trainer.train()` returned.
        processor ([`BridgeProcessor`]): Saved beside the model.
        output_dir (`str`): Where the checkpoint goes.
        stage (`str`, *optional*): The training stage for the card; defaults to [`infer_stage`] (`"stage2"` for the
            caption collator, `"sft"` for the chat collator or TRL's SFTTrainer, `"dpo"` for TRL's DPOTrainer, ...).
        data (`str`, *optional*): The training data in words; defaults to [`describe_train_data`] of the trainer's
            training set.
        metrics (`dict`, *optional*): More metrics for the card (held-out scores); the training losses are always in.
        base_models (`str` or `list[str]`, *optional*): Hub ids the model was built from, for the card.

    Returns:
        `dict`: `train_loss` (mean over the run) and `final_loss` (last logged), then `metrics`.

    Example:

    ```python
    >>> metrics = finish_training(trainer, trainer.train(), processor, "outputs/sft")  # doctest: +SKIP
    ```"""
    from ..modeling.hub import describe_checkpoint

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {"train_loss": result.training_loss, "final_loss": losses[-1] if losses else math.nan, **(metrics or {})}
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        describe_checkpoint(
            output_dir,
            processor=processor,
            stage=stage or infer_stage(trainer),
            data=data or describe_train_data(trainer.train_dataset),
            metrics=metrics,
            base_models=base_models,
        )
        print(f"final train loss {metrics['final_loss']:.4f} (mean over the run {metrics['train_loss']:.4f})")
    return metrics


def caption_context_texts(captions: list[str], image_ids: list[int], separator: str, seed: int = 0) -> list[str]:
    """
    Every caption preceded by another caption of the same image, `"{other} {separator} {caption}"`: text on which a
    language model learns to restate what its context says.

    Why: in stage 2 a frozen language model is steered only by the image tokens in front of the caption. Pretrained
    LMs have learned from web text to carry what the context says into what they write; a tiny LM trained on lone
    captions has not, and then no bridge can steer it (measured on the built-in data: held-out CIDEr 0.44 after
    training on lone captions, 0.94 after the same number of stage-2 steps on an LM trained on these pairs).

    Args:
        captions (`list[str]`): The captions, several per image.
        image_ids (`list[int]`): The image of each caption.
        separator (`str`): Put between the two captions (e.g. the tokenizer's EOS).
        seed (`int`, *optional*, defaults to 0): Which other caption precedes each one.

    Example:

    ```python
    >>> from vlbridge.trainers.scripts import caption_context_texts
    >>> caption_context_texts(["a red circle", "one red circle", "a blue star"], [0, 0, 1], "</s>")
    ['one red circle </s> a red circle', 'a red circle </s> one red circle', 'a blue star </s> a blue star']
    ```
    """
    by_image: dict[int, list[str]] = {}
    for image_id, caption in zip(image_ids, captions):
        by_image.setdefault(image_id, []).append(caption)
    rng = random.Random(seed)
    texts = []
    for image_id, caption in zip(image_ids, captions):
        others = [other for other in by_image[image_id] if other != caption] or [caption]
        texts.append(f"{rng.choice(others)} {separator} {caption}")
    return texts


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
