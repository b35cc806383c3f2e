"""
What the training scripts share: the presets shipped with the package, their parser (TRL's `TrlParser`: a YAML
`--config` gives the defaults, flags override), the model and chat-data arguments, and saving at the end of a run.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from ..configuration.configuration_bridge_vlm import IMAGE_FUSIONS
from ..data.user import DATASET_FORMATS, load_user_dataset
from ..hub.checkpoint import check_model_folder
from ..modeling.freezing import FREEZE_STAGES


# The bridges of the tiny VLM built in code (`vlbridge.scripts.tiny.TINY_BRIDGES`, whose module imports torch).
BRIDGES = ("mlp", "perceiver", "qformer")

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


# Presets shipped under an earlier name: still found, with a warning naming the new one.
RENAMED_PRESETS = {
    "pretrain_qformer_builtin": "stage1_builtin",
    "pretrain_generative_builtin": "stage2_builtin",
    "pretrain_generative_stage1": "stage2_from_stage1",
    "safety_sft_stage2": "lora_sft_stage2",
}


def preset_names() -> list[str]:
    """
    The names of the YAML presets shipped in `vlbridge/scripts/presets/`, which `--config NAME` accepts.

    Example:

    ```python
    >>> from vlbridge.scripts.utils import preset_names
    >>> "sft_builtin" in preset_names() and "demo" in preset_names()
    True
    ```
    """
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def resolve_preset(config: str | os.PathLike) -> Path:
    """
    The YAML file `--config` names: an existing path, else a preset shipped with the package, by name with or without
    `.yaml` (`"sft_builtin"`, `"sft_builtin.yaml"`, `"examples/configs/sft_builtin.yaml"` from another folder).

    Args:
        config (`str` or `os.PathLike`): A path, or a preset name.

    Returns:
        `Path`: The file to read.

    Example:

    ```python
    >>> from vlbridge.scripts.utils import resolve_preset
    >>> resolve_preset("stage1_builtin").name
    'stage1_builtin.yaml'
    >>> resolve_preset("no_such_preset")
    Traceback (most recent call last):
    ...
    FileNotFoundError: --config 'no_such_preset' is neither a file nor a preset shipped with vlbridge ...
    ```
    """
    path = Path(config)
    if path.is_file():
        return path
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if name in RENAMED_PRESETS:
        warnings.warn(
            f"The preset {name!r} is now called {RENAMED_PRESETS[name]!r}; the old name goes in the next release.",
            FutureWarning,
            stacklevel=2,
        )
        name = RENAMED_PRESETS[name]
    shipped = PRESETS_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"--config {str(config)!r} is neither a file nor a preset shipped with vlbridge (presets: "
        f"{', '.join(preset_names())})."
    )


def run_script(script: str, argv: list[str] | None = None, parser: ScriptParser | None = None) -> ScriptResult:
    """
    Runs the training script `vlbridge.scripts.<script>` on a command line, as `python -m vlbridge.scripts.<script>`
    does: `main(*make_parser().parse_args_and_config(argv))`.

    Args:
        script (`str`): `"stage1"`, `"stage2"`, `"sft"`, `"sft_trl"`, `"lora_sft"` or `"dpo"`.
        argv (`list[str]`, *optional*): The command line; defaults to `sys.argv[1:]`.
        parser ([`ScriptParser`], *optional*): The script's `make_parser()`, customised (the `vlbridge` command sets
            its program name and description).

    Returns:
        [`ScriptResult`]: The run's metrics, checkpoint folder and training log.

    Example:

    ```python
    >>> from vlbridge.scripts.utils import run_script
    >>> result = run_script("sft", ["--config", "sft_builtin", "--max_steps", "20"])  # doctest: +SKIP
    ```
    """
    import importlib

    module = importlib.import_module(f"{__package__}.{script}")
    parsed = (parser or module.make_parser()).parse_args_and_config(sys.argv[1:] if argv is None else argv)
    return module.main(*parsed)


@dataclass
class ScriptResult:
    """
    What a training script's `main` returns.

    Args:
        metrics (`dict[str, float]`): The metrics the run printed (training losses, held-out scores).
        output_dir (`str`): The saved model the next stage starts from (for the LoRA scripts, the merged model).
        log_history (`list[dict]`): The trainer's `state.log_history` (losses per logging step, then a summary).
    """

    metrics: dict
    output_dir: str
    log_history: list[dict] = field(default_factory=list)


class ScriptParser(TrlParser):
    """
    The parser of every training script: TRL's [`~trl.TrlParser`] (`--config FILE` sets the defaults, flags on the
    command line override them, an `env:` mapping sets environment variables), where `--config` also takes the name of
    a preset shipped with vlbridge ([`resolve_preset`]) and `--config=FILE` works too. When the arguments hold a
    `seed` (TrainingArguments), `transformers.set_seed(seed)` runs before returning: the scripts build their models
    before the Trainer seeds itself, and a run must be repeatable.

    Example:

    ```python
    >>> from dataclasses import dataclass
    >>> from vlbridge.scripts.utils import ScriptParser
    >>> @dataclass
    ... class Args:
    ...     steps: int = 1
    >>> ScriptParser(Args).parse_args_and_config(["--steps", "3"])
    (Args(steps=3),)
    ```
    """

    def parse_args_and_config(self, args: Iterable[str] | None = None, **kwargs) -> tuple:
        args = list(sys.argv[1:] if args is None else args)
        for at, arg in enumerate(args):
            if arg.startswith("--config="):
                args[at : at + 1] = ["--config", arg.split("=", 1)[1]]
        if "--config" in args:
            at = args.index("--config")
            if at + 1 == len(args):
                self.error("--config needs a YAML file or a preset name.")
            args[at + 1] = str(resolve_preset(args[at + 1]))
        parsed = super().parse_args_and_config(args, **kwargs)
        seeds = [value.seed for value in parsed if isinstance(getattr(value, "seed", None), int)]
        if seeds:
            from transformers import set_seed

            set_seed(seeds[-1])
        return parsed


OUTSIDE_PATHS_HELP = (
    "Accept --dataset image paths that leave the dataset's folder (absolute paths elsewhere, or '..'); refused by "
    "default, since a metadata file could otherwise read any file on the machine."
)


def dataset_help(kind: str) -> str:
    """The `--dataset` help of a command that trains on `kind` (`"captions"`, `"chats"` or `"preferences"`)."""
    return f"'builtin' (the built-in synthetic data), or your own {kind}: {DATASET_FORMATS[kind]}."


def check_decoder_only_language_model(model, trainer: str = "SFT / DPO") -> None:
    """
    Refuses a VLM whose language model is an encoder-decoder (T5) before a TRL trainer is built: TRL's `SFTTrainer` and
    `DPOTrainer` feed one sequence through a causal LM, which an encoder-decoder cannot take (it fails deep in T5 with
    "You must specify exactly one of input_ids or inputs_embeds"). `vlbridge sft` (the HF Trainer, `ChatCollator`)
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
            "(encoder-decoder): use `vlbridge sft` (the HF Trainer) instead."
        )


@dataclass
class ChatDataArguments:
    """The chat data of the SFT scripts: the built-in chats (`vlbridge.data.make_synthetic_chat`) or `--dataset`."""

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
class VisionFeaturesArguments:
    """Training from a cache of the frozen vision tower's features (`vlbridge cache-features`)."""

    vision_features: str | None = field(
        default=None,
        metadata={
            "help": "A folder written by `vlbridge cache-features` for this model: batches carry the frozen vision "
            "tower's cached features instead of pixels, so the tower never runs while training. Refused when the "
            "run trains the tower, or when another tower, feature layer or image processor made the cache."
        },
    )


def load_vision_features(path: str | None, model, image_processor):
    """
    The vision-feature cache at `path` ([`~vlbridge.data.feature_cache.VisionFeatureCache`]), checked to have been
    made by `model`'s tower, feature settings and `image_processor`; None when `path` is unset (or '').

    Raises:
        `ValueError`: naming the fix, when `model`'s vision tower trains (cached features would go stale and the tower
            would get no gradient), or the cache does not fit the model ([`VisionFeatureCache.check`]).
    """
    if not path:
        return None
    from ..data.feature_cache import VisionFeatureCache, vision_tower_of

    trainable = [name for name, parameter in vision_tower_of(model).named_parameters() if parameter.requires_grad]
    if trainable:
        raise ValueError(
            f"--vision_features {path}: this run trains the vision tower ({len(trainable)} tensors, e.g. "
            f"{trainable[0]}), and features cached once would go stale. Keep the tower frozen (--freeze stage2 or "
            "finetune; stage 1: --freeze_vision_tower true, or a saved model whose tower is frozen), or drop "
            "--vision_features."
        )
    cache = VisionFeatureCache(path).check(model, image_processor)
    print(f"training on cached vision features: {cache}")
    return cache


@dataclass
class VLMModelArguments:
    """Which VLM a script trains: a saved checkpoint, or the tiny VLM built in code (`vlbridge.scripts.tiny`)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved vlbridge checkpoint with its processor; unset builds a tiny VLM."}
    )
    bridge: str = field(
        default="qformer", metadata={"help": "Bridge of the tiny VLM built in code.", "choices": list(BRIDGES)}
    )
    image_fusion: str = field(
        default="tokens",
        metadata={
            "help": "How images enter the tiny VLM's language model: 'tokens' (placeholders, BLIP-2 / LLaVA) or "
            "'gated_cross_attention' (Flamingo's gated blocks beside the frozen LM).",
            "choices": list(IMAGE_FUSIONS),
        },
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


def load_model_and_processor(args: VLMModelArguments, vocabulary: list[str], end_of_chunk_token: bool = False):
    """The checkpoint at `args.model_name_or_path` with its processor, or the tiny VLM of `vlbridge.scripts.tiny` with
    a word-level tokenizer over `vocabulary` (and OpenFlamingo's `<|endofchunk|>`, its last id, with
    `end_of_chunk_token`); frozen as `args.freeze` says."""
    from transformers import AutoProcessor, CLIPImageProcessor

    from ..data import build_word_tokenizer
    from ..modeling import (
        BridgeVLMForConditionalGeneration,
        add_qformer_instruction_input,
        qformer_instruction_processor,
    )
    from ..processing import BridgeProcessor
    from .tiny import tiny_vlm

    if args.model_name_or_path is not None:
        check_model_folder(args.model_name_or_path)
        model = BridgeVLMForConditionalGeneration.from_pretrained(args.model_name_or_path)
        processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    else:
        tokenizer = build_word_tokenizer(vocabulary, end_of_chunk_token=end_of_chunk_token)
        model = tiny_vlm(args.bridge, tokenizer, args.image_fusion)
        size = model.config.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor = BridgeProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens)
    if args.instruct_from_stage1:  # "" on the command line turns a preset's value off
        model = add_qformer_instruction_input(model, args.instruct_from_stage1)
        processor = qformer_instruction_processor(processor, args.instruct_from_stage1)
    model.freeze(args.freeze)
    return model, processor


def builtin_chat_dataset(args: ChatDataArguments, command: str = "vlbridge sft"):
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
    card naming the stage, the data and the metrics ([`~vlbridge.modeling.saving.describe_checkpoint`]); prints and
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
    from ..hub.checkpoint import describe_checkpoint, describe_train_data, infer_stage

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


__all__ = [
    "BRIDGES",
    "PRESETS_DIR",
    "ScriptResult",
    "ScriptParser",
    "ChatDataArguments",
    "VLMModelArguments",
    "VisionFeaturesArguments",
    "builtin_chat_dataset",
    "check_decoder_only_language_model",
    "dataset_help",
    "finish_training",
    "load_model_and_processor",
    "load_vision_features",
    "preset_names",
    "resolve_preset",
    "run_script",
]
