"""
BLIP's CapFilt: bootstrap a noisy image-text set into a cleaner one. A captioner writes synthetic captions for every
image (nucleus sampling), a filter scores every web and synthetic caption with ITM, and the captions it rejects go.

    # the built-in captions with 40% of them made wrong, a stage-1 model as captioner and as filter
    vlbridge capfilt --captioner outputs/demo/stage1 --filter outputs/demo/stage1 --output_dir outputs/capfilt
    # your own captions (a folder with metadata.jsonl, a .jsonl, or .tar shards)
    vlbridge capfilt --captioner outputs/stage1 --filter outputs/stage1 --dataset my_captions/ --output_dir out

The output folder holds one parquet shard per `--chunk_images` images (`shard-00000.parquet`, ...), each row an
(image, text) pair with its provenance: `source` (`web` or `synthetic`), `itm_score` (the filter's match
probability), `kept`; `summary.json` has the counts kept / dropped per source and, on the built-in noisy data, the
filter's precision and recall at finding the wrong captions. Shards are written whole (to a temporary name, then
renamed), so a killed run continues with `--resume` where it stopped, with nothing duplicated or lost. Under
`accelerate launch` (or torchrun) each process takes every n-th chunk and the first one writes the summary. Load the
result with `datasets.load_dataset("parquet", data_files="out/shard-*.parquet")` and keep the `kept` rows.

The captioner and the filter are stage-1 Q-Former models (`vlbridge stage1`, or BLIP-2's released stage 1 after
`vlbridge convert`); BLIP's MED model is not in vlbridge yet.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import make_synthetic_image_text
from ..data.synthetic_noisy import add_caption_noise
from ..data.user import CAPFILT_RUN_FILE as RUN_FILE
from ..data.user import load_user_dataset
from ..processing.image_utils import to_rgb_image
from ..trainers import ImageTextCollator
from .inference import load_checkpoint
from .utils import OUTSIDE_PATHS_HELP, ScriptParser, ScriptResult


SUMMARY_FILE = "summary.json"


@dataclass
class CapFiltArguments:
    """What `vlbridge capfilt` reads, writes and how it decides."""

    captioner: str | None = field(default=None, metadata={"help": "A stage-1 folder whose ITG head writes captions."})
    filter: str | None = field(default=None, metadata={"help": "A stage-1 folder whose ITM head scores captions."})
    output_dir: str = field(default="outputs/capfilt", metadata={"help": "Where the shards and the summary go."})
    dataset: str = field(
        default="builtin",
        metadata={
            "help": "'builtin' (the built-in captions with --noise of them made wrong), or your own captions: a "
            "folder with a metadata.jsonl, a .jsonl of image / caption lines, or .tar shards."
        },
    )
    allow_outside_paths: bool = field(default=False, metadata={"help": OUTSIDE_PATHS_HELP})
    noise: float = field(default=0.4, metadata={"help": "Built-in data: the share of captions made wrong."})
    num_images: int = field(default=500, metadata={"help": "Built-in data: images."})
    captions_per_image: int = field(default=1, metadata={"help": "Built-in data: web captions per image."})
    image_size: int = field(default=48, metadata={"help": "Built-in data: image side (as the models were trained)."})
    max_objects: int = field(default=2, metadata={"help": "Built-in data: most objects per scene."})
    data_seed_value: int = field(default=1, metadata={"help": "Built-in data: seed (1: scenes unlike training's)."})
    num_synthetic: int = field(default=1, metadata={"help": "Synthetic captions per image (BLIP: 1)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling of the synthetic captions (BLIP: 0.9)."})
    max_new_tokens: int = field(default=30, metadata={"help": "Longest synthetic caption."})
    threshold: float = field(default=0.5, metadata={"help": "Kept when the filter's ITM match probability >= this."})
    batch_size: int = field(default=16, metadata={"help": "Images per forward."})
    chunk_images: int = field(default=256, metadata={"help": "Images per output shard (the unit of --resume)."})
    resume: bool = field(default=False, metadata={"help": "Continue a run in --output_dir with the same settings."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})


def make_parser() -> ScriptParser:
    """The command line: [`CapFiltArguments`], with `--config` presets."""
    return ScriptParser((CapFiltArguments,))


def check_arguments(args: CapFiltArguments) -> None:
    """Refuses, naming the fix, what would make the run meaningless."""
    if not args.captioner or not args.filter:
        raise ValueError("vlbridge capfilt needs --captioner DIR and --filter DIR (stage-1 folders).")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold is an ITM match probability: a number in [0, 1], got {args.threshold}.")
    if args.num_synthetic < 0 or args.batch_size < 1 or args.chunk_images < 1:
        raise ValueError("--num_synthetic must be >= 0, --batch_size and --chunk_images >= 1.")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}.")


def load_models(args: CapFiltArguments):
    """The captioner and the filter, each checked to have the head its job needs."""
    captioner, filter_ = load_checkpoint(args.captioner), load_checkpoint(args.filter)
    for role, checkpoint, head in (("captioner", captioner, "lm_head"), ("filter", filter_, "itm_head")):
        if checkpoint.kind != "stage1" or not hasattr(checkpoint.model, head):
            raise ValueError(
                f"--{role} {getattr(args, role)} is a {type(checkpoint.model).__name__}; the {role} must be a "
                f"stage-1 model with its {head} (QFormerForImageTextPretraining: vlbridge stage1, or BLIP-2's "
                "Blip2ForImageTextRetrieval after vlbridge convert)."
            )
    if args.num_synthetic and captioner.model.config.decoder_start_token_id is None:
        raise ValueError(f"--captioner {args.captioner} has no decoder_start_token_id ([DEC]): it cannot caption.")
    return captioner, filter_


def load_pairs(args: CapFiltArguments):
    """The web pairs: `image`, `caption`, `image_id` (+ `noisy`, `noise_kind` on the built-in data)."""
    if args.dataset == "builtin":
        clean = make_synthetic_image_text(
            {"train": args.num_images},
            image_size=args.image_size,
            seed=args.data_seed_value,
            captions_per_image=args.captions_per_image,
            max_objects=args.max_objects,
        )["train"]
        return add_caption_noise(clean, args.noise, seed=args.data_seed_value)
    pairs = load_user_dataset(args.dataset, "captions", "vlbridge capfilt", args.allow_outside_paths)
    if "image_id" not in pairs.column_names:
        pairs = pairs.add_column("image_id", list(range(len(pairs))))
    return pairs


def _start_run(args: CapFiltArguments, output: Path, rank: int = 0, poll_seconds: float = 1.0) -> None:
    """Writes the run's settings, or checks them against those of the run in `output` when resuming. Under several
    processes only the first one writes them; the others wait for them and check they run the same settings."""
    settings = {key: value for key, value in asdict(args).items() if key not in ("resume", "output_dir")}
    run_file = output / RUN_FILE
    if rank != 0:
        while not run_file.is_file():
            time.sleep(poll_seconds)
        changed = sorted(key for key in settings if json.loads(run_file.read_text()).get(key) != settings[key])
        if changed:
            raise ValueError(f"This process runs other settings than the first one: {changed}.")
        return
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if not args.resume:
            raise ValueError(f"{output} already holds a CapFilt run: pass --resume to continue it, or another folder.")
        changed = sorted(key for key in settings if previous.get(key) != settings[key])
        if changed:
            raise ValueError(f"--resume with other settings than the run in {output}: {changed}.")
        return
    if output.is_dir() and any(output.iterdir()):
        raise ValueError(f"{output} is not empty and holds no CapFilt run: pick another --output_dir.")
    output.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2))


@torch.no_grad()
def synthetic_captions(captioner, images: list, args: CapFiltArguments) -> list[list[str]]:
    """`args.num_synthetic` nucleus-sampled captions per image."""
    if not args.num_synthetic:
        return [[] for _ in images]
    processor = captioner.processor
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ids = captioner.model.generate_captions(
        pixel_values.to(captioner.model.device),
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        top_p=args.top_p,
        num_return_sequences=args.num_synthetic,
    )  # (B * num_synthetic, L)
    texts = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [texts[i * args.num_synthetic : (i + 1) * args.num_synthetic] for i in range(len(images))]


@torch.no_grad()
def match_probabilities(filter_, images: list, texts: list[list[str]]) -> list[list[float]]:
    """The filter's ITM match probability of every (image, text) pair, texts tokenized as in stage-1 training."""
    model, processor = filter_.model, filter_.processor
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    vision = model.get_vision_features(pixel_values.to(model.device))  # (B, P, Dv)
    owners = [i for i, row in enumerate(texts) for _ in row]
    flat = [text for row in texts for text in row]
    if not flat:
        return [[] for _ in texts]
    tokens = ImageTextCollator(processor.image_processor, processor.tokenizer).tokenize(flat)
    logits = model.compute_itm_logits(
        vision[owners], tokens["input_ids"].to(model.device), tokens["attention_mask"].to(model.device)
    )  # (pairs, 2)
    probabilities = logits.float().softmax(dim=-1)[:, 1].tolist()
    out, at = [], 0
    for row in texts:
        out.append(probabilities[at : at + len(row)])
        at += len(row)
    return out


def _image_groups(pairs) -> list[tuple[int, list[int]]]:
    """`(image_id, row indices)` in the order the images first appear."""
    groups: dict[int, list[int]] = {}
    for row, image_id in enumerate(pairs["image_id"]):
        groups.setdefault(image_id, []).append(row)
    return list(groups.items())


def process_chunk(captioner, filter_, pairs, groups, args: CapFiltArguments, skipped: list) -> list[dict]:
    """The output rows of one chunk of images: every web caption and every synthetic one, scored and decided."""
    rows = []
    for start in range(0, len(groups), args.batch_size):
        batch, images = [], []
        for image_id, members in groups[start : start + args.batch_size]:
            # Each row is read (and its image decoded) once; an image's web captions are its rows' captions.
            records = [pairs[row] for row in members]
            try:
                images.append(to_rgb_image(records[0]["image"]))
                batch.append((image_id, records))
            except Exception as error:  # a corrupt image: counted, reported, the run goes on
                skipped.append({"image_id": image_id, "error": " ".join(str(error).split())[:200]})
        if not batch:
            continue
        web = [[record["caption"] for record in records] for _, records in batch]
        synthetic = synthetic_captions(captioner, images, args)
        scores = match_probabilities(filter_, images, [w + s for w, s in zip(web, synthetic)])
        for (image_id, records), image, web_texts, synthetic_texts, row_scores in zip(
            batch, images, web, synthetic, scores
        ):
            sources = ["web"] * len(web_texts) + ["synthetic"] * len(synthetic_texts)
            extras = records + [{}] * len(synthetic_texts)
            for text, source, score, extra in zip(web_texts + synthetic_texts, sources, row_scores, extras):
                rows.append(
                    {
                        "image": image,
                        "image_id": image_id,
                        "text": text,
                        "source": source,
                        "itm_score": score,
                        "kept": score >= args.threshold,
                        "noisy": extra.get("noisy"),
                        "noise_kind": extra.get("noise_kind"),
                    }
                )
    return rows


def _write_shard(rows: list[dict], path: Path) -> None:
    """One shard, written to a temporary name and renamed: a shard on disk is always whole."""
    from datasets import Dataset, Features, Image, Value

    features = Features(
        {
            "image": Image(),
            "image_id": Value("int64"),
            "text": Value("string"),
            "source": Value("string"),
            "itm_score": Value("float32"),
            "kept": Value("bool"),
            "noisy": Value("bool"),
            "noise_kind": Value("string"),
        }
    )
    temporary = path.with_suffix(".tmp")
    Dataset.from_list(rows, features=features).to_parquet(str(temporary))
    os.replace(temporary, path)


def _wait_for(shards: list[Path], world_size: int, poll_seconds: float = 2.0) -> None:
    """The first process summarises once every process has written its shards (no process group needed)."""
    missing = [shard for shard in shards if not shard.is_file()]
    if missing and world_size > 1:
        print(f"waiting for the other processes' {len(missing)} shard(s)...", flush=True)
    while missing:
        time.sleep(poll_seconds)
        missing = [shard for shard in missing if not shard.is_file()]


def summarize(shards: list[Path]) -> dict:
    """Kept / dropped per source and, where the web captions carry `noisy`, the filter's precision and recall."""
    from datasets import Dataset

    data = Dataset.from_parquet([str(path) for path in shards]).remove_columns("image")
    # The three columns are read once; the counts are taken over them.
    rows = list(zip(data["source"], data["kept"], data["noisy"]))
    summary: dict = {}
    for source in ("web", "synthetic"):
        kept = [row_kept for row_source, row_kept, _ in rows if row_source == source]
        summary[f"{source}_kept"], summary[f"{source}_dropped"] = sum(kept), len(kept) - sum(kept)
    web = [(kept, noisy) for source, kept, noisy in rows if source == "web" and noisy is not None]
    if web:
        dropped_noisy = sum(1 for kept, noisy in web if not kept and noisy)
        dropped = sum(1 for kept, _ in web if not kept)
        noisy = sum(1 for _, noisy in web if noisy)
        summary["filter_precision"] = dropped_noisy / dropped if dropped else math.nan
        summary["filter_recall"] = dropped_noisy / noisy if noisy else math.nan
    return summary


def main(args: CapFiltArguments) -> ScriptResult:
    """
    Runs CapFilt on the parsed arguments (what [`make_parser`] returns).

    Returns:
        [`~vlbridge.scripts.utils.ScriptResult`]: the summary (kept / dropped per source, the filter's precision and
        recall on the built-in noisy data, skipped images) and the output folder.

    Example:

    ```python
    >>> from vlbridge.scripts.capfilt import main, make_parser
    >>> argv = ["--captioner", "outputs/demo/stage1", "--filter", "outputs/demo/stage1", "--output_dir", "out"]
    >>> result = main(*make_parser().parse_args_and_config(argv))  # doctest: +SKIP
    >>> result.metrics["web_kept"], result.metrics["filter_precision"]  # doctest: +SKIP
    ```
    """
    check_arguments(args)
    output = Path(args.output_dir)
    captioner, filter_ = load_models(args)
    pairs = load_pairs(args)
    # Under `accelerate launch` / torchrun each process takes every world_size-th chunk; the shards are the merge.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    _start_run(args, output, rank)
    groups = _image_groups(pairs)
    chunks = [groups[start : start + args.chunk_images] for start in range(0, len(groups), args.chunk_images)]
    shards = [output / f"shard-{number:05d}.parquet" for number in range(len(chunks))]
    skipped: list[dict] = []
    for number, (chunk, shard) in enumerate(zip(tqdm(chunks, desc="CapFilt chunks"), shards)):
        if shard.is_file() or number % world_size != rank:  # written by the run being resumed, or another process's
            continue
        # Each chunk samples from its own seed: a resumed run writes what an uninterrupted one would have.
        torch.manual_seed(args.seed * 100_003 + number)
        chunk_skipped: list[dict] = []
        rows = process_chunk(captioner, filter_, pairs, chunk, args, chunk_skipped)
        # The skipped images of a chunk are recorded beside it, before the shard, so that a resumed run counts them.
        shard.with_suffix(".skipped.json").write_text(json.dumps(chunk_skipped))
        _write_shard(rows, shard)
    if rank != 0:
        return ScriptResult({}, str(output))
    _wait_for(shards, world_size)
    for shard in shards:
        skipped += json.loads(shard.with_suffix(".skipped.json").read_text())
    summary = {**summarize(shards), "skipped_images": len(skipped)}
    (output / SUMMARY_FILE).write_text(json.dumps({**summary, "skipped": skipped}, indent=2))
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return ScriptResult(summary, str(output))


__all__ = ["CapFiltArguments", "main", "make_parser"]


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(sys.argv[1:]))
