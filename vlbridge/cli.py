"""
The `vlbridge` command: a thin layer over the recipes (`vlbridge.recipes`) and the checkpoint helpers.

    vlbridge demo                                  # the whole recipe on built-in data, with a report
    vlbridge pretrain --config pretrain_qformer_builtin --max_steps 20
    vlbridge train --stage sft --model_name_or_path outputs/demo/stage2
    vlbridge dpo --model_name_or_path outputs/demo/sft
    vlbridge caption outputs/demo/stage2 image.png
    vlbridge retrieve outputs/demo/stage1 --images a.png b.png --texts "a red circle" "two blue stars"
    vlbridge eval outputs/demo/sft
    vlbridge convert path/to/blip2-checkpoint outputs/blip2-vlbridge

The training commands take a YAML preset (`--config`: a path, or the name of a preset shipped in
`vlbridge/recipes/presets/`) and any of its values as overrides (`--max_steps 100`); `caption`, `retrieve`, `eval`
and `convert` take `--config FILE` too, a YAML of their own options, which flags on the command line override.
The training commands and `eval` take your own data with `--dataset` (captions, chats or preference rows, as each
command's `--help` says).

An error prints one line, `vlbridge <command>: error: <what to fix>`, and exits with status 2; `--debug` (anywhere
on the command line) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks (examples), arguments show their defaults."""


# command -> (recipe module, default preset, one-line help, example)
RECIPE_COMMANDS = {
    "pretrain": (
        "stage1",
        "pretrain_qformer_builtin",
        "BLIP-2 stage 1: pretrain a Q-Former with ITC + ITM + ITG, report held-out retrieval recall, save.",
        "vlbridge pretrain --output_dir outputs/stage1 --max_steps 2000",
    ),
    "dpo": (
        "dpo",
        "dpo_builtin",
        "DPO with LoRA on built-in preference pairs (TRL), preference accuracy before / after, save adapter + merged.",
        "vlbridge dpo --model_name_or_path outputs/demo/sft --output_dir outputs/dpo --max_steps 100",
    ),
}
# `vlbridge train --stage NAME` -> (recipe module, default preset, what it does)
TRAIN_STAGES = {
    "stage2": ("stage2", "pretrain_generative_builtin", "BLIP-2 stage 2: the bridge learns captions, frozen LM"),
    "sft": ("sft", "sft_builtin", "supervised fine-tuning on chats (HF Trainer + ChatCollator), held-out VQA"),
    "sft-trl": ("sft_trl", "sft_trl_builtin", "supervised fine-tuning on chats with TRL's SFTTrainer"),
    "lora-sft": ("lora_sft", "sft_trl_builtin", "safety / helpfulness LoRA SFT with TRL's SFTTrainer"),
}
TRAIN_EXAMPLE = (
    "vlbridge train --stage stage2 --from_stage1 outputs/stage1 --lm_text_steps 300 --image_size 48 --max_objects 2\n"
    "  vlbridge train --stage sft --model_name_or_path outputs/demo/stage2 --num_eval_images 50 --image_size 48"
)


DEMO_DESCRIPTION = """\
Stage 1 (Q-Former ITC + ITM + ITG, held-out R@1), stage 2 (the VLM around the stage-1 Q-Former, frozen LM,
held-out CIDEr), SFT (held-out VQA accuracy) and DPO with LoRA (preference accuracy before / after), on built-in
data, in one process on CPU (10-12 min on 2 cores; --fast: under a minute). Nothing is downloaded.

Every stage is saved with save_pretrained into OUTPUT_DIR/<stage>/ (DPO: dpo/adapter and dpo/merged), with the
preset it ran with in OUTPUT_DIR/configs/<stage>.yaml. OUTPUT_DIR/report/report.html shows the loss curves,
held-out images with their captions and answers, and a retrieval example; the metric table is printed at the end.

Overrides: --<section>.<key> <value>, section among shared (every stage), stage1, stage2, sft, dpo, report;
see vlbridge/recipes/presets/demo.yaml for the values.

example:
  vlbridge demo --output_dir outputs/demo --stage1.max_steps 500 --shared.seed 1"""


# What `--dataset` takes, per training command.
DATASET_KINDS = {
    "pretrain": "captions (image, caption)",
    "dpo": "preference rows (images, prompt, chosen, rejected)",
    "stage2": "captions (image, caption)",
    "sft": "chats (messages, images)",
    "sft-trl": "chats (messages, images)",
    "lora-sft": "chats (messages, images)",
}


def _recipe_description(purpose: str, preset: str, example: str, data: str) -> str:
    return (
        f"{purpose}\n\nWithout --config the preset {preset!r} is used (vlbridge/recipes/presets/{preset}.yaml). "
        "--config takes a YAML path\nor a preset name; the defaults shown below are that preset's values, and every "
        f"flag given overrides them.\n--dataset takes your own {data}: see its help below.\n\n"
        f"example:\n  {example}"
    )


def _config_argument(argv: list[str]) -> str | None:
    """The value of `--config` in `argv`, if given."""
    for at, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and at + 1 < len(argv):
            return argv[at + 1]
    return None


def show_preset_defaults(parser, config: str) -> None:
    """Makes the preset's values the parser's defaults, so that `--help` shows the values a run really uses."""
    import yaml

    from .recipes.common import resolve_preset

    values = yaml.safe_load(resolve_preset(config).read_text()) or {}
    known = {action.dest for action in parser._actions}
    parser.set_defaults(**{key: value for key, value in values.items() if key in known})


def run_recipe(module: str, preset: str, argv: list[str], prog: str, description: str) -> int:
    """Runs `vlbridge.recipes.<module>` on `argv`, with `--config <preset>` unless `argv` names one."""
    recipe = importlib.import_module(f"vlbridge.recipes.{module}")
    parser = recipe.build_parser()
    parser.prog, parser.description, parser.formatter_class = prog, description, _HelpFormatter
    parser.usage = f"{prog} [-h] [--config PRESET] [--ARGUMENT VALUE ...]"
    if _config_argument(argv) is None:
        argv = ["--config", preset, *argv]
    # The preset's values reach the run as flags; as defaults too, `--help` shows them instead of the dataclasses'.
    show_preset_defaults(parser, _config_argument(argv))
    recipe.run(argv, parser=parser)
    return 0


def _add_demo(commands) -> None:
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


def _add_inference(commands) -> None:
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
        "--images a.png b.png --texts 'a large red circle' 'two small blue stars'",
    )
    retrieve.add_argument("checkpoint", help="A stage-1 checkpoint folder (vlbridge pretrain).")
    retrieve.add_argument("--images", nargs="+", required=True, help="Image files.")
    retrieve.add_argument("--texts", nargs="+", required=True, help="Texts.")
    retrieve.add_argument("--top_k", type=int, default=3, help="Matches printed per query.")
    retrieve.add_argument("--config", default=None, help=CONFIG_HELP)

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
        help="Convert a transformers BLIP-2 / InstructBLIP checkpoint.",
        description="Converts a transformers BLIP-2 / InstructBLIP checkpoint (a folder or a Hub id holding a "
        "Blip2ForConditionalGeneration\nor an InstructBlipForConditionalGeneration) into a vlbridge VLM with a "
        "Q-Former bridge, and its processor.\nLogits and greedy generations match transformers' for the same "
        "inputs.\n\n"
        "example:\n  vlbridge convert Salesforce/blip2-opt-2.7b outputs/blip2-opt-2.7b-vlbridge --dtype bfloat16",
    )
    convert.add_argument("source", help="The transformers checkpoint (folder or Hub id).")
    convert.add_argument("destination", help="Where the converted model and processor are saved.")
    convert.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="Load dtype.")
    convert.add_argument("--config", default=None, help=CONFIG_HELP)


INFERENCE_COMMANDS = ("caption", "retrieve", "eval", "convert")
CONFIG_HELP = "A YAML file of this command's options (keys are the flag names); flags on the command line override it."


def _apply_yaml_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """For the inference commands: the options in `--config FILE` become the subcommand's defaults."""
    if not argv or argv[0] not in INFERENCE_COMMANDS:
        return
    path = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if path is None:
        return
    import yaml

    subparser = parser._subparsers._group_actions[0].choices[argv[0]]
    options = {action.dest: action for action in subparser._actions if action.option_strings}
    values = yaml.safe_load(open(path)) or {}
    unknown = sorted(set(values) - set(options) - {"config"})
    if unknown:
        subparser.error(f"{path} sets {unknown}, which `vlbridge {argv[0]}` does not take ({sorted(options)}).")
    subparser.set_defaults(**{key: value for key, value in values.items() if key != "config"})


def build_parser() -> argparse.ArgumentParser:
    """
    The `vlbridge` parser: one subcommand per task; the training commands pass their flags on to their recipe.

    Example:

    ```python
    >>> from vlbridge.cli import build_parser
    >>> args, rest = build_parser().parse_known_args(["train", "--stage", "sft", "--max_steps", "5"])
    >>> args.command, args.stage, rest
    ('train', 'sft', ['--max_steps', '5'])
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
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    _add_demo(commands)
    for name, recipe in RECIPE_COMMANDS.items():
        commands.add_parser(name, help=recipe[2], add_help=False, allow_abbrev=False)
    train = commands.add_parser(
        "train",
        add_help=False,
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
        help="Train a VLM: stage 2 (captions, frozen LM), SFT (Trainer or TRL) or LoRA SFT, with a preset.",
        description="Train a VLM with one of the recipes (--stage), on built-in data:\n"
        + "\n".join(f"  {name:9s} {text} (preset {preset!r})" for name, (_, preset, text) in TRAIN_STAGES.items())
        + "\n\n`vlbridge train --stage NAME --help` lists that recipe's arguments.\n\nexamples:\n  "
        + TRAIN_EXAMPLE,
    )
    train.add_argument("--stage", choices=list(TRAIN_STAGES), help="Which recipe.")
    _add_inference(commands)
    return parser


def _environment_threads() -> int:
    """`$OMP_NUM_THREADS` when it is a plain positive number, else 1."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _demo(args, rest: list[str]) -> int:
    from .recipes.demo import parse_overrides, run_demo
    from .report import format_metric_table

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
    from .recipes.inference import caption_images, load_checkpoint
    from .trainers.scripts import check_model_folder

    check_model_folder(args.checkpoint)

    captions = caption_images(load_checkpoint(args.checkpoint), args.images, args.prompt, args.max_new_tokens)
    for image, caption in zip(args.images, captions):
        print(f"{image}: {caption}")
    return 0


def _retrieve(args) -> int:
    from .recipes.inference import load_checkpoint, rank_matches

    scores_i2t, scores_t2i = rank_matches(load_checkpoint(args.checkpoint), args.images, args.texts)
    for heading, queries, candidates, scores in (
        ("text -> images", args.texts, args.images, scores_t2i),
        ("image -> texts", args.images, args.texts, scores_i2t),
    ):
        print(f"{heading} (score: ITM match logit + ITC cosine)")
        for query, row in zip(queries, scores):
            top = row.topk(min(args.top_k, len(candidates)))
            ranked = "  ".join(
                f"{rank}. {candidates[i]!r} ({s:.3f})"
                for rank, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1)
            )
            print(f"  {query!r}: {ranked}")
    return 0


def _evaluate(args) -> int:
    from .recipes.inference import evaluate_checkpoint, load_checkpoint
    from .report import format_metric_table
    from .trainers.scripts import check_model_folder

    images = None
    if args.dataset is not None:
        from .data import group_captions
        from .trainers.scripts import load_user_dataset

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

    from .conversion import convert_blip2_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, processor = convert_blip2_checkpoint(args.source, args.destination, dtype=dtype)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    saved = "with its processor" if processor is not None else "without a processor (none found in the source)"
    print(
        f"converted {args.source} -> {args.destination}: {parameters:,} parameters, "
        f"{model.config.num_image_tokens} image tokens, {saved}"
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
    parser = build_parser()
    _apply_yaml_config(parser, argv)
    args, rest = parser.parse_known_args(argv)
    if args.command in RECIPE_COMMANDS:
        module, preset, purpose, example = RECIPE_COMMANDS[args.command]
        description = _recipe_description(purpose, preset, example, DATASET_KINDS[args.command])
        return run_recipe(module, preset, rest, f"vlbridge {args.command}", description)
    if args.command == "train":
        if args.stage is None:
            subparser = parser._subparsers._group_actions[0].choices["train"]
            if {"-h", "--help"} & set(rest):
                subparser.print_help()
                return 0
            subparser.error("--stage is required: " + ", ".join(TRAIN_STAGES))
        module, preset, purpose = TRAIN_STAGES[args.stage]
        description = _recipe_description(
            f"{purpose[0].upper()}{purpose[1:]}.", preset, TRAIN_EXAMPLE, DATASET_KINDS[args.stage]
        )
        return run_recipe(module, preset, rest, f"vlbridge train --stage {args.stage}", description)
    if args.command == "demo":
        return _demo(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"caption": _caption, "retrieve": _retrieve, "eval": _evaluate, "convert": _convert}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
