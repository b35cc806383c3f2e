"""
The `vlbridge` command: one subcommand per job, each a thin layer over a training script (`vlbridge.scripts`), the
demo or the checkpoint helpers.

    vlbridge demo                                  # the whole recipe on built-in data, with a report
    vlbridge stage1 --config stage1_builtin --max_steps 20
    vlbridge stage2 --from_stage1 outputs/stage1 --lm_text_steps 300
    vlbridge sft --model_name_or_path outputs/demo/stage2
    vlbridge dpo --model_name_or_path outputs/demo/sft
    vlbridge caption outputs/demo/stage2 image.png
    vlbridge retrieve outputs/demo/stage1 --images a.png b.png --texts "a red circle" "two blue stars"
    vlbridge classify --model outputs/demo/stage1 --labels "a red circle,a blue square" a.png b.png
    vlbridge eval outputs/demo/sft
    vlbridge convert path/to/blip2-checkpoint outputs/blip2-vlbridge
    vlbridge cache-features --model outputs/demo/stage2 --dataset builtin --out outputs/features

Every command takes `--config FILE`, a YAML of its options (keys are the flag names), and flags that override it;
the training commands also take the name of a preset shipped in `vlbridge/scripts/presets/` and default to their
own. The training commands and `eval` take your own data with `--dataset` (captions, chats or preference rows, as
each command's `--help` says). `vlbridge pretrain` and `vlbridge train --stage NAME` still work, with a warning
naming the command that replaces them.

An error prints one line, `vlbridge <command>: error: <what to fix>`, and exits with status 2; `--debug` (anywhere
on the command line) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks (examples), arguments show their defaults."""


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that knows the names of its options, which its `--config FILE` may set."""

    def __init__(self, *args, **kwargs):
        self.option_names: set[str] = set()  # before argparse's own __init__, which adds -h / --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings:
            self.option_names.add(action.dest)
        return action


# command (= the module in vlbridge.scripts) -> (default preset, one-line help, example, what --dataset takes)
TRAINING_COMMANDS = {
    "stage1": (
        "stage1_builtin",
        "BLIP-2 stage 1: pretrain a Q-Former with ITC + ITM + ITG, report held-out retrieval recall, save.",
        "vlbridge stage1 --output_dir outputs/stage1 --max_steps 2000",
        "captions (image, caption)",
    ),
    "stage2": (
        "stage2_builtin",
        "BLIP-2 stage 2: the bridge learns captions for a frozen LM (from a stage-1 run or from scratch).",
        "vlbridge stage2 --from_stage1 outputs/stage1 --lm_text_steps 300 --image_size 48 --max_objects 2",
        "captions (image, caption)",
    ),
    "sft": (
        "sft_builtin",
        "Supervised fine-tuning on chats with the HF Trainer and ChatCollator (any LM), held-out VQA.",
        "vlbridge sft --model_name_or_path outputs/demo/stage2 --num_eval_images 50 --image_size 48",
        "chats (messages, images)",
    ),
    "sft_trl": (
        "sft_trl_builtin",
        "Supervised fine-tuning on chats with TRL's SFTTrainer (decoder-only LMs).",
        "vlbridge sft_trl --model_name_or_path outputs/demo/stage2 --max_steps 100",
        "chats (messages, images)",
    ),
    "lora_sft": (
        "lora_sft_builtin",
        "Safety / helpfulness LoRA SFT with TRL's SFTTrainer; preference accuracy before / after, adapter + merged.",
        "vlbridge lora_sft --model_name_or_path outputs/sft-trl-builtin --max_steps 200",
        "chats (messages, images)",
    ),
    "dpo": (
        "dpo_builtin",
        "DPO with LoRA on built-in preference pairs (TRL), preference accuracy before / after, adapter + merged.",
        "vlbridge dpo --model_name_or_path outputs/demo/sft --output_dir outputs/dpo --max_steps 100",
        "preference rows (images, prompt, chosen, rejected)",
    ),
}
# Scripts that are no training run (no default preset): command -> (one-line help, example). The script is
# `vlbridge.scripts.<command>`, with `-` as `_` (`script_module`).
SCRIPT_COMMANDS = {
    "capfilt": (
        "BLIP's CapFilt: caption every image, keep the web and synthetic captions the ITM filter accepts.",
        "vlbridge capfilt --captioner outputs/demo/stage1 --filter outputs/demo/stage1 --output_dir outputs/capfilt",
    ),
    "cache-features": (
        "Run a frozen vision tower once over a dataset and store its features, to train with --vision_features.",
        "vlbridge cache-features --model outputs/my-vlm --dataset builtin --out outputs/my-vlm-features\n"
        "  vlbridge stage2 --model_name_or_path outputs/my-vlm --vision_features outputs/my-vlm-features",
    ),
}


def script_module(command: str) -> str:
    """The module of `vlbridge.scripts` behind a command: its name, `-` written `_` (`cache-features`)."""
    return command.replace("-", "_")


# Earlier command lines, still accepted for one release: `vlbridge pretrain`, `vlbridge train --stage NAME`.
RENAMED_COMMANDS = {"pretrain": "stage1"}
RENAMED_STAGES = {"stage2": "stage2", "sft": "sft", "sft-trl": "sft_trl", "lora-sft": "lora_sft"}


DEMO_DESCRIPTION = """\
Stage 1 (Q-Former ITC + ITM + ITG, held-out R@1), stage 2 (the VLM around the stage-1 Q-Former, frozen LM,
held-out CIDEr), SFT (held-out VQA accuracy) and DPO with LoRA (preference accuracy before / after), on built-in
data, in one process on CPU (10-12 min on 2 cores; --fast: under a minute). Nothing is downloaded.

Every stage is saved with save_pretrained into OUTPUT_DIR/<stage>/ (DPO: dpo/adapter and dpo/merged), with the
preset it ran with in OUTPUT_DIR/configs/<stage>.yaml. OUTPUT_DIR/report/report.html shows the loss curves,
held-out images with their captions and answers, and a retrieval example; the metric table is printed at the end.

Overrides: --<section>.<key> <value>, section among shared (every stage), stage1, stage2, sft, dpo, report;
see vlbridge/scripts/presets/demo.yaml for the values.

example:
  vlbridge demo --output_dir outputs/demo --stage1.max_steps 500 --shared.seed 1"""


def _script_description(purpose: str, preset: str, example: str, data: str) -> str:
    return (
        f"{purpose}\n\nWithout --config the preset {preset!r} is used (vlbridge/scripts/presets/{preset}.yaml). "
        "--config takes a YAML path\nor a preset name; the defaults shown below are that preset's values, and every "
        f"flag given overrides them.\n--dataset takes your own {data}: see its help below.\n\n"
        f"example:\n  {example}"
    )


def _run_script_command(command: str, argv: list[str], description: str, usage: str | None = None) -> int:
    """Runs `vlbridge.scripts.<command>` on `argv` with its own parser, presented as `vlbridge <command>`."""
    from .scripts.utils import run_script

    parser = importlib.import_module(f"vlbridge.scripts.{script_module(command)}").make_parser()
    parser.prog, parser.description, parser.formatter_class = f"vlbridge {command}", description, _HelpFormatter
    if usage is not None:
        parser.usage = usage
    run_script(script_module(command), argv, parser)
    return 0


def run_script(command: str, argv: list[str]) -> int:
    """Runs the training script `vlbridge.scripts.<command>` on `argv`, with `--config <its preset>` unless `argv`
    names one."""
    preset, purpose, example, data = TRAINING_COMMANDS[command]
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        argv = ["--config", preset, *argv]
    # The parser (TRL's TrlParser) makes the preset's values its defaults: `--help` shows what a run really uses.
    description = _script_description(purpose, preset, example, data)
    usage = f"vlbridge {command} [-h] [--config PRESET] [--ARGUMENT VALUE ...]"
    return _run_script_command(command, argv, description, usage)


def _deprecated(argv: list[str]) -> list[str]:
    """`vlbridge pretrain ...` and `vlbridge train --stage NAME ...` as today's command line, with a warning."""
    if argv and argv[0] in RENAMED_COMMANDS:
        new = [RENAMED_COMMANDS[argv[0]], *argv[1:]]
    elif argv and argv[0] == "train":
        rest = list(argv[1:])
        stage = None
        for at, arg in enumerate(rest):
            if arg.startswith("--stage="):
                stage, rest = arg.split("=", 1)[1], rest[:at] + rest[at + 1 :]
                break
            if arg == "--stage" and at + 1 < len(rest):
                stage, rest = rest[at + 1], rest[:at] + rest[at + 2 :]
                break
        if stage not in RENAMED_STAGES:
            choices = ", ".join(f"vlbridge {name}" for name in TRAINING_COMMANDS)
            raise ValueError(f"`vlbridge train` is replaced by one command per method: {choices}.")
        new = [RENAMED_STAGES[stage], *rest]
    else:
        return argv
    old = " ".join(argv[: len(argv) - len(new) + 1])
    print(
        f"vlbridge: `vlbridge {old}` is deprecated and goes in the next release; use `vlbridge {new[0]}`.",
        file=sys.stderr,
    )
    return new


def _add_demo(commands) -> argparse.ArgumentParser:
    demo = commands.add_parser(
        "demo",
        formatter_class=_HelpFormatter,
        description=DEMO_DESCRIPTION,
        help="Run BLIP-2's whole recipe on built-in data (stage 1, stage 2, SFT, DPO + LoRA) and write a report.",
    )
    demo.add_argument("--output_dir", default="outputs/demo", help="Where the stages, configs and report go.")
    demo.add_argument("--fast", action="store_true", help="Tiny budgets: a smoke run of under a minute.")
    demo.add_argument("--config", default="demo", help="The demo preset: a YAML path or a shipped preset name.")
    demo.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="PyTorch intra-op threads; default: $OMP_NUM_THREADS if set, else 1. The demo's models are tiny: more "
        "threads gain little and, on cores shared with other work, make each step up to 10x slower.",
    )
    return demo


def _add_inference(commands) -> dict[str, argparse.ArgumentParser]:
    caption = commands.add_parser(
        "caption",
        formatter_class=_HelpFormatter,
        help="Caption images with a saved VLM (stage 2, SFT or DPO).",
        description="Greedy captions of images by a saved vlbridge VLM, in the layout it was trained on: "
        "'<image> prompt' for a\nstage-2 model, a chat turn ('describe the image.') for SFT / DPO models.\n\n"
        "example:\n  vlbridge caption outputs/demo/stage2 scene1.png scene2.png",
    )
    caption.add_argument("checkpoint", help="A saved VLM folder (for a LoRA run, its merged/ folder).")
    caption.add_argument("images", nargs="+", help="Image files.")
    caption.add_argument(
        "--prompt", default=None, help="Text after the image (default: none for stage 2, else 'describe the image.')."
    )
    caption.add_argument("--max_new_tokens", type=int, default=30, help="Most tokens per caption.")
    caption.add_argument("--config", default=None, help=CONFIG_HELP)

    retrieve = commands.add_parser(
        "retrieve",
        formatter_class=_HelpFormatter,
        help="Rank images against texts with a stage-1 checkpoint.",
        description="Scores every image against every text with a stage-1 Q-Former model (ITC, then ITM "
        "re-ranking) and prints\nthe best matches both ways.\n\nexample:\n  vlbridge retrieve outputs/demo/stage1 "
        "--images a.png b.png --texts 'a large red circle' 'two small blue stars'\n  vlbridge retrieve "
        "outputs/demo/stage1 --images gallery/*.png --texts 'two small blue stars' --index gallery_index",
    )
    retrieve.add_argument("checkpoint", help="A stage-1 checkpoint folder (vlbridge stage1).")
    retrieve.add_argument("--images", nargs="+", required=True, help="Image files.")
    retrieve.add_argument("--texts", nargs="+", required=True, help="Texts.")
    retrieve.add_argument("--top_k", type=int, default=3, help="Matches printed per query.")
    retrieve.add_argument(
        "--index",
        default=None,
        metavar="DIR",
        help="Large galleries: keep the images' embeddings in an on-disk index in DIR (built on the first run, reused "
        "on later runs with the same images and checkpoint) and search it chunk by chunk; prints text -> images only.",
    )
    retrieve.add_argument("--batch_size", type=int, default=32, help="Images or texts per forward.")
    retrieve.add_argument("--config", default=None, help=CONFIG_HELP)

    classify = commands.add_parser(
        "classify",
        formatter_class=_HelpFormatter,
        help="Zero-shot image classification with a stage-1 checkpoint.",
        description="Scores every image against every label with a stage-1 Q-Former model (ITC; --itm re-ranks with "
        "ITM), through\ntransformers' zero-shot-image-classification pipeline, and prints each image's labels with "
        "their\nprobabilities, best first.\n\nexample:\n  vlbridge classify --model outputs/demo/stage1 --labels "
        "'a red circle,a blue square,a green star' scene1.png scene2.png",
    )
    classify.add_argument("images", nargs="+", help="Image files.")
    classify.add_argument("--model", required=True, help="A stage-1 checkpoint folder (vlbridge stage1).")
    classify.add_argument("--labels", required=True, help="Two or more candidate labels, separated by commas.")
    classify.add_argument(
        "--template", default="{}", help="Prompt around each label ('{}' = the label as it is; e.g. 'a {}')."
    )
    classify.add_argument("--itm", action="store_true", help="Re-rank with ITM (match logit + ITC cosine).")
    classify.add_argument("--top_k", type=int, default=None, help="Labels printed per image (None: all).")
    classify.add_argument("--config", default=None, help=CONFIG_HELP)

    evaluate = commands.add_parser(
        "eval",
        formatter_class=_HelpFormatter,
        help="Score a checkpoint on the built-in held-out test split.",
        description="Held-out scores on the built-in test split, as fit the checkpoint: R@1 / R@5 both ways, ITM "
        "accuracy and\nexact captions for a stage-1 model; CIDEr and BLEU-4 for a stage-2 model; VQA accuracy and "
        "CIDEr for an SFT\nor DPO model. Images are drawn at the model's own input size.\n\n"
        "example:\n  vlbridge eval outputs/demo/sft --num_images 100",
    )
    evaluate.add_argument("checkpoint", help="A saved vlbridge VLM or stage-1 folder.")
    evaluate.add_argument("--num_images", type=int, default=50, help="Held-out images.")
    evaluate.add_argument("--data_seed_value", type=int, default=0, help="Seed of the built-in data (as in training).")
    evaluate.add_argument("--max_objects", type=int, default=2, help="Most objects per scene (as in training).")
    evaluate.add_argument("--captions_per_image", type=int, default=5, help="Reference captions per image.")
    evaluate.add_argument(
        "--dataset",
        default=None,
        help="Score on your own captions instead of the built-in test split: a folder of images with a metadata.jsonl "
        '({"file_name": "1.png", "text": "a red circle"} per line), a .jsonl of {"image": ..., "caption": ...} lines, '
        "or .tar shards. Captioning (CIDEr, BLEU-4) for a VLM, retrieval for a stage-1 model; the first "
        "--num_images images.",
    )
    evaluate.add_argument(
        "--allow_outside_paths", action="store_true", help="Accept --dataset image paths that leave its folder."
    )
    evaluate.add_argument("--config", default=None, help=CONFIG_HELP)

    convert = commands.add_parser(
        "convert",
        formatter_class=_HelpFormatter,
        help="Convert a released checkpoint (transformers BLIP-2, InstructBLIP, ...) into a vlbridge one.",
        description="Converts a released transformers checkpoint (a folder or a Hub id) into the vlbridge model of "
        "its family, and its\nprocessor; the folder's config says which (vlbridge.conversion.CONVERTERS lists what is "
        "accepted). BLIP-2 /\nInstructBLIP generation models become a VLM with a Q-Former bridge whose logits and "
        "greedy generations match\ntransformers' for the same inputs.\n\n"
        "example:\n  vlbridge convert Salesforce/blip2-opt-2.7b outputs/blip2-opt-2.7b-vlbridge --dtype bfloat16",
    )
    convert.add_argument("source", help="The transformers checkpoint (folder or Hub id).")
    convert.add_argument("destination", help="Where the converted model and processor are saved.")
    convert.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="Load dtype.")
    convert.add_argument("--config", default=None, help=CONFIG_HELP)
    return {"caption": caption, "retrieve": retrieve, "classify": classify, "eval": evaluate, "convert": convert}


INFERENCE_COMMANDS = ("caption", "retrieve", "classify", "eval", "convert")
CONFIG_HELP = "A YAML file of this command's options (keys are the flag names); flags on the command line override it."


def _apply_yaml_config(subparser: _CommandParser, command: str, argv: list[str]) -> None:
    """For the commands without a preset: the options in `--config FILE` become the subcommand's defaults."""
    path = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if path is None:
        return
    import yaml

    options = subparser.option_names
    values = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(values) - options)
    if unknown:
        subparser.error(f"{path} sets {unknown}, which `vlbridge {command}` does not take ({sorted(options)}).")
    subparser.set_defaults(**{key: value for key, value in values.items() if key != "config"})


def build_parser() -> argparse.ArgumentParser:
    """
    The `vlbridge` parser: one subcommand per job; a training command passes its flags on to its script's parser.
    `parser.commands` maps each command to its subparser.

    Example:

    ```python
    >>> from vlbridge.cli import build_parser
    >>> args, rest = build_parser().parse_known_args(["sft", "--max_steps", "5"])
    >>> args.command, rest
    ('sft', ['--max_steps', '5'])
    ```
    """
    parser = argparse.ArgumentParser(
        prog="vlbridge",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Vision-language models whose vision encoder and language model are linked by a learned bridge "
        "(Q-Former,\nPerceiver Resampler, MLP): BLIP-2's recipe from pretraining to DPO, on the HF stack.",
        epilog="Run `vlbridge <command> --help` for a command's arguments and an example.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vlbridge {__version__}")
    parser.add_argument("--debug", action="store_true", help="On an error, show the full traceback (any position).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<command>", parser_class=_CommandParser)
    commands = {"demo": _add_demo(subparsers)}
    for name, (_, purpose, _, _) in TRAINING_COMMANDS.items():
        # The script's own parser takes the flags (`run_script`); this entry gives the command its line in --help.
        commands[name] = subparsers.add_parser(name, help=purpose, add_help=False, allow_abbrev=False)
    for name, (purpose, _) in SCRIPT_COMMANDS.items():
        commands[name] = subparsers.add_parser(name, help=purpose, add_help=False, allow_abbrev=False)
    commands.update(_add_inference(subparsers))
    parser.commands = commands
    return parser


def _environment_threads() -> int:
    """`$OMP_NUM_THREADS` when it is a plain positive number, else 1."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _demo(args, rest: list[str]) -> int:
    from .demo.demo import parse_overrides, run_demo
    from .evaluation.tables import format_metric_table

    try:
        overrides = parse_overrides(rest)
    except ValueError as error:
        raise SystemExit(f"vlbridge demo: error: {error}") from None
    import torch

    threads = args.num_threads or _environment_threads()
    torch.set_num_threads(threads)
    print(f"vlbridge demo: {threads} PyTorch thread(s) (--num_threads), output in {args.output_dir}", flush=True)
    result = run_demo(args.output_dir, config=args.config, fast=args.fast, overrides=overrides)
    minutes, seconds = divmod(round(result.seconds), 60)
    print(f"\nvlbridge demo: held-out metrics ({minutes} min {seconds:02d} s in all)\n")
    print(format_metric_table(result.table))
    print(f"\nreport: {result.report.resolve()}")
    return 0


def _caption(args) -> int:
    from .hub.checkpoint import check_model_folder
    from .scripts.inference import caption_images, load_checkpoint

    check_model_folder(args.checkpoint)

    captions = caption_images(load_checkpoint(args.checkpoint), args.images, args.prompt, args.max_new_tokens)
    for image, caption in zip(args.images, captions):
        print(f"{image}: {caption}")
    return 0


def _retrieve(args) -> int:
    from .scripts.inference import load_checkpoint, rank_matches

    checkpoint = load_checkpoint(args.checkpoint)
    # Re-rank at least the printed matches, so that none of them is an unscored -100.
    k_test = max(16, args.top_k)
    scores_i2t, scores_t2i = rank_matches(checkpoint, args.images, args.texts, k_test, args.index, args.batch_size)
    for heading, queries, candidates, scores in (
        ("text -> images", args.texts, args.images, scores_t2i),
        ("image -> texts", args.images, args.texts, scores_i2t),
    ):
        if scores is None:  # --index: a gallery is searched by text only
            continue
        print(f"{heading} (score: ITM match logit + ITC cosine)")
        for query, row in zip(queries, scores):
            top = row.topk(min(args.top_k, len(candidates)))
            ranked = "  ".join(
                f"{rank}. {candidates[i]!r} ({s:.3f})"
                for rank, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1)
            )
            print(f"  {query!r}: {ranked}")
    return 0


def _classify(args) -> int:
    from transformers import AutoModelForZeroShotImageClassification, pipeline

    from .hub.checkpoint import check_model_folder
    from .scripts.inference import load_image

    labels = [label.strip() for label in args.labels.split(",")]
    if not all(labels):
        raise ValueError(f"--labels {args.labels!r} holds an empty label: give labels separated by single commas.")
    check_model_folder(args.model)
    # The folder's own tokenizer and image processor, as `pipeline(..., model=folder)` finds them.
    model = AutoModelForZeroShotImageClassification.from_pretrained(args.model, zero_shot_use_itm=args.itm)
    classifier = pipeline(
        "zero-shot-image-classification", model=model, tokenizer=args.model, image_processor=args.model
    )
    images = [load_image(path) for path in args.images]
    results = classifier(images, candidate_labels=labels, hypothesis_template=args.template)
    heading = "ITM match logit + ITC cosine" if args.itm else "ITC"
    print(f"label probabilities (softmax over {len(labels)} labels of the {heading} scores)")
    for image, ranked in zip(args.images, results):
        print(f"{image}:")
        for result in ranked[: args.top_k]:
            print(f"  {result['score']:.3f}  {result['label']}")
    return 0


def _evaluate(args) -> int:
    from .evaluation.tables import format_metric_table
    from .hub.checkpoint import check_model_folder
    from .scripts.inference import evaluate_checkpoint, load_checkpoint

    images = None
    if args.dataset is not None:
        from .data import group_captions
        from .data.user import load_user_dataset

        pairs = load_user_dataset(args.dataset, "captions", "vlbridge eval", args.allow_outside_paths)
        if "image_id" not in pairs.column_names:
            pairs = pairs.add_column("image_id", list(range(len(pairs))))
        images = group_captions(pairs)
    check_model_folder(args.checkpoint)
    checkpoint = load_checkpoint(args.checkpoint)
    metrics = evaluate_checkpoint(
        checkpoint,
        num_images=args.num_images,
        seed=args.data_seed_value,
        max_objects=args.max_objects,
        captions_per_image=args.captions_per_image,
        images=images,
    )
    print(format_metric_table({checkpoint.stage or checkpoint.kind: metrics}))
    return 0


def _convert(args) -> int:
    import torch

    from .conversion import convert_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, processor = convert_checkpoint(args.source, args.destination, dtype=dtype)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    saved = "with its processor" if processor is not None else "without a processor (none found in the source)"
    tokens = getattr(model.config, "num_image_tokens", None)
    tokens = f"{tokens} image tokens, " if isinstance(tokens, int) else ""
    print(
        f"converted {args.source} -> {args.destination}: {type(model).__name__}, {parameters:,} parameters, "
        f"{tokens}{saved}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """
    The `vlbridge` command line. An error prints one line, `vlbridge <command>: error: <message>`, on stderr and
    returns 2 (argparse's status for a bad command line); `--debug` anywhere in `argv` re-raises it instead.

    Args:
        argv (`list[str]`, *optional*): The arguments without the program name; defaults to `sys.argv[1:]`.

    Returns:
        `int`: The exit status.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        return _run(argv)
    except Exception as error:
        if debug:
            raise
        # A user of the command wants what to fix, not a 20-line traceback through transformers; --debug has it.
        prog = f"vlbridge {argv[0]}" if argv and not argv[0].startswith("-") else "vlbridge"
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _run(argv: list[str]) -> int:
    """`main` without the error handling."""
    argv = _deprecated(argv)
    if argv and argv[0] in TRAINING_COMMANDS:
        return run_script(argv[0], argv[1:])
    if argv and argv[0] in SCRIPT_COMMANDS:
        purpose, example = SCRIPT_COMMANDS[argv[0]]
        return _run_script_command(argv[0], argv[1:], f"{purpose}\n\nexample:\n  {example}")
    parser = build_parser()
    if argv and argv[0] in INFERENCE_COMMANDS:
        _apply_yaml_config(parser.commands[argv[0]], argv[0], argv)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        return _demo(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {"caption": _caption, "retrieve": _retrieve, "classify": _classify, "eval": _evaluate}
    return {**handlers, "convert": _convert}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
