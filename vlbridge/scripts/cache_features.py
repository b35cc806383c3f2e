"""
Runs a frozen vision tower once over a dataset and stores what the bridge reads, so that `vlbridge stage1`,
`vlbridge stage2` and `vlbridge sft` train from the stored features (`--vision_features DIR`) instead of re-running
the tower on every image in every epoch. The script behind `vlbridge cache-features`; docs/feature_cache.md.

    # the built-in captions of `vlbridge stage2` (same data options), features of a saved VLM's tower, in bf16
    vlbridge cache-features --model outputs/my-vlm --dataset builtin --out outputs/my-vlm-features
    vlbridge stage2 --model_name_or_path outputs/my-vlm --vision_features outputs/my-vlm-features

    # your own chats, fp32 (bit-identical to running the tower), two processes (GPUs) writing disjoint shards at once
    CUDA_VISIBLE_DEVICES=0 vlbridge cache-features --model outputs/my-vlm --dataset chats.jsonl --kind chats \
        --out outputs/chat-features --dtype fp32 --process_index 0 --num_processes 2
    CUDA_VISIBLE_DEVICES=1 vlbridge cache-features --model outputs/my-vlm --dataset chats.jsonl --kind chats \
        --out outputs/chat-features --dtype fp32 --process_index 1 --num_processes 2

`--model` is a saved VLM folder or a stage-1 folder (`vlbridge stage1`, or a BLIP-2 stage-1 checkpoint after
`vlbridge convert`); its vision tower and image processor make the features. `--dataset` takes what the recipes take
(their loaders are used): `builtin`, or a folder / `.jsonl` / `.tar` shards of captions (`--kind captions`) or chats
(`--kind chats`). A rerun with the same arguments resumes: finished shards are checked and skipped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..data.feature_cache import DTYPES, FeatureCacheSummary, write_feature_cache
from .utils import OUTSIDE_PATHS_HELP, ChatDataArguments, ScriptParser, ScriptResult, builtin_chat_dataset


KINDS = ("captions", "chats")


@dataclass
class CacheFeaturesArguments:
    """What `vlbridge cache-features` encodes, with which model, and where the cache goes."""

    model: str | None = field(
        default=None,
        metadata={"help": "A saved VLM folder or stage-1 folder: its vision tower and image processor are used."},
    )
    dataset: str = field(
        default="builtin",
        metadata={
            "help": "'builtin' (the built-in data of `vlbridge stage2` for --kind captions, of `vlbridge sft` for "
            "--kind chats, with the data options below), or your own captions / chats as the recipes take them: a "
            "folder with a metadata.jsonl, a .jsonl, or .tar shards."
        },
    )
    out: str | None = field(default=None, metadata={"help": "The cache folder; a rerun into it resumes."})
    kind: str = field(
        default="captions",
        metadata={"help": "What --dataset holds: captions (one image a row) or chats.", "choices": KINDS},
    )
    dtype: str = field(
        default="bf16",
        metadata={"help": "Stored dtype: bf16 (half the disk) or fp32 (bit-identical).", "choices": sorted(DTYPES)},
    )
    batch_size: int = field(default=32, metadata={"help": "Images per vision-tower forward."})
    shard_size: int = field(
        default=512, metadata={"help": "Images per shard: the unit of resuming and of the split over processes."}
    )
    process_index: int = field(default=0, metadata={"help": "K: this process writes every N-th shard from shard K."})
    num_processes: int = field(default=1, metadata={"help": "N processes writing disjoint shards (run each K)."})
    device: str | None = field(default=None, metadata={"help": "Where the tower runs; default cuda when available."})
    allow_outside_paths: bool = field(default=False, metadata={"help": OUTSIDE_PATHS_HELP})
    num_train_images: int = field(default=1000, metadata={"help": "Built-in data: images (as the recipe's)."})
    image_size: int = field(default=32, metadata={"help": "Built-in data: image side (as the recipe's)."})
    captions_per_image: int = field(default=3, metadata={"help": "Built-in captions: captions per image."})
    max_objects: int = field(default=2, metadata={"help": "Built-in data: most objects per scene."})
    max_turns: int = field(default=2, metadata={"help": "Built-in chats: most question-answer turns per chat."})
    data_seed_value: int = field(default=0, metadata={"help": "Built-in data: seed (as the recipe's)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})


def make_parser() -> ScriptParser:
    """
    The command line: [`CacheFeaturesArguments`], with `--config` presets.

    Example:

    ```python
    >>> from vlbridge.scripts.cache_features import make_parser
    >>> (args,) = make_parser().parse_args_and_config(["--model", "outputs/vlm", "--out", "outputs/features"])
    >>> args.dtype, args.shard_size, args.kind
    ('bf16', 512, 'captions')
    ```
    """
    return ScriptParser((CacheFeaturesArguments,))


def load_model(path: str, device: str | None = None):
    """`(model, image_processor)` of a saved VLM or stage-1 folder, loaded as the recipes load them (so that the
    fingerprints the cache records are those the recipes will check)."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    from ..configuration import BridgeVLMConfig
    from ..hub.checkpoint import check_model_folder
    from ..modeling import BridgeVLMForConditionalGeneration
    from .stage1 import load_stage1_folder

    check_model_folder(path)
    if isinstance(AutoConfig.from_pretrained(path), BridgeVLMConfig):
        model = BridgeVLMForConditionalGeneration.from_pretrained(path)
        image_processor = AutoProcessor.from_pretrained(path).image_processor
    else:
        model, _, image_processor = load_stage1_folder(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), image_processor


def load_images(args: CacheFeaturesArguments):
    """The rows whose images are cached, through the recipes' own loaders: `vlbridge stage2`'s captions or `vlbridge
    sft`'s chats (built-in with the given data options, or `--dataset`)."""
    if args.kind not in KINDS:
        raise ValueError(f"--kind must be one of {KINDS}, got {args.kind!r}.")
    if args.kind == "chats":
        chats = ChatDataArguments(
            dataset=args.dataset,
            allow_outside_paths=args.allow_outside_paths,
            num_train_images=args.num_train_images,
            image_size=args.image_size,
            max_turns=args.max_turns,
            max_objects=args.max_objects,
            data_seed_value=args.data_seed_value,
        )
        return builtin_chat_dataset(chats, command="vlbridge cache-features").select_columns(["images"])
    from .stage2 import CaptionDataArguments, load_captions

    captions = CaptionDataArguments(
        dataset=args.dataset,
        allow_outside_paths=args.allow_outside_paths,
        num_train_images=args.num_train_images,
        image_size=args.image_size,
        captions_per_image=args.captions_per_image,
        max_objects=args.max_objects,
        data_seed_value=args.data_seed_value,
    )
    return load_captions(captions)["train"].select_columns(["image"])


def main(args: CacheFeaturesArguments) -> ScriptResult:
    """
    Writes this process's shards of the cache (and the index, when it finds every shard written).

    Returns:
        [`~vlbridge.scripts.utils.ScriptResult`]: `metrics` holds the counts (`num_images`, `num_shards`, `written`,
        `skipped`, `complete`), `output_dir` the cache folder.

    Example:

    ```python
    >>> from vlbridge.scripts.cache_features import main, make_parser
    >>> argv = ["--model", "outputs/vlm", "--dataset", "builtin", "--out", "outputs/features"]
    >>> main(*make_parser().parse_args_and_config(argv)).metrics["complete"]  # doctest: +SKIP
    True
    ```
    """
    if not args.model or not args.out:
        raise ValueError("vlbridge cache-features needs --model DIR (a saved VLM or stage-1 folder) and --out DIR.")
    model, image_processor = load_model(args.model, args.device)
    rows = load_images(args)
    summary: FeatureCacheSummary = write_feature_cache(
        model,
        image_processor,
        rows,
        args.out,
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        process_index=args.process_index,
        num_processes=args.num_processes,
        progress=not args.disable_tqdm,
    )
    state = "complete" if summary.complete else "not complete yet (other processes' shards missing)"
    print(
        f"{summary.directory}: {summary.num_images} images in {summary.num_shards} shards; this process wrote "
        f"{len(summary.written)} and found {len(summary.skipped)} already written; the cache is {state}"
    )
    metrics = {
        "num_images": summary.num_images,
        "num_shards": summary.num_shards,
        "written": len(summary.written),
        "skipped": len(summary.skipped),
        "complete": summary.complete,
    }
    return ScriptResult(metrics, summary.directory)


__all__ = ["CacheFeaturesArguments", "load_images", "load_model", "main", "make_parser"]


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(sys.argv[1:]))
