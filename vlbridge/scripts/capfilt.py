"""
BLIP's CapFilt: bootstrap a noisy image-text set into a cleaner one. A captioner writes synthetic captions for every
image (nucleus sampling), a filter scores every web and synthetic caption with ITM, and the captions it rejects go.

    # the built-in captions with 40% of them made wrong, a stage-1 model as captioner and as filter
    vlbridge capfilt --captioner outputs/demo/stage1 --filter outputs/demo/stage1 --output_dir outputs/capfilt
    # your own captions (a folder with metadata.jsonl, a .jsonl, or .tar shards, which are streamed)
    vlbridge capfilt --captioner outputs/stage1 --filter outputs/stage1 --dataset my_captions/ --output_dir out
    # as BLIP: captioner and filter first fine-tuned on a clean set (here built-in images none of the web's)
    vlbridge capfilt --captioner outputs/stage1 --filter outputs/stage1 --clean_dataset builtin --output_dir out

The output folder holds one parquet shard per `--chunk_images` images (`shard-00000.parquet`, ...), each row an
(image, text) pair with its provenance: `source` (`web` or `synthetic`), `itm_score` (the filter's match
probability), `kept`; `summary.json` has the counts kept / dropped per source and, on the built-in noisy data, the
filter's precision and recall at finding the wrong captions; `report.html` shows them with example images and their
captions. Shards are written whole (to a temporary name, then renamed), so a killed run continues with `--resume`
where it stopped, with nothing duplicated or lost. `.tar` shards are streamed: at most one chunk of images is held
at a time (`vlbridge.scripts.capfilt_data`). Under `accelerate launch` (or torchrun) each process takes every n-th
chunk and the first one writes the summary and the report. Load the result with
`datasets.load_dataset("parquet", data_files="out/shard-*.parquet")` and keep the `kept` rows.

The captioner and the filter are any stage-1 style models that say they can caption (`supports_captioning`) and
match (`supports_matching`): vlbridge's Q-Former (`vlbridge stage1`, or BLIP-2's released stage 1 after
`vlbridge convert`), or BLIP's MED model. With `--clean_dataset` copies of them are first fine-tuned as BLIP does
(`vlbridge.scripts.capfilt_clean`) and saved into the output folder.
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

from ..data.user import CAPFILT_RUN_FILE as RUN_FILE
from ..processing.image_utils import to_rgb_image
from ..trainers import ImageTextCollator
from .capfilt_clean import finetune_models, load_clean_data
from .capfilt_data import ImageChunks, ImageGroup, load_web_data
from .capfilt_models import CapFiltModel, load_model
from .capfilt_report import write_report
from .utils import OUTSIDE_PATHS_HELP, ScriptParser, ScriptResult


SUMMARY_FILE = "summary.json"
# Settings that change only how the result is shown: a resumed run may change them.
_PRESENTATION = ("resume", "output_dir", "report_examples")


@dataclass
class CapFiltArguments:
    """What `vlbridge capfilt` reads, writes and how it decides."""

    captioner: str | None = field(
        default=None, metadata={"help": "A stage-1 style folder whose model writes captions (supports_captioning)."}
    )
    filter: str | None = field(
        default=None, metadata={"help": "A stage-1 style folder whose ITM head scores captions (supports_matching)."}
    )
    output_dir: str = field(
        default="outputs/capfilt", metadata={"help": "Where the shards, the summary and the report go."}
    )
    dataset: str = field(
        default="builtin",
        metadata={
            "help": "'builtin' (the built-in captions with --noise of them made wrong), or your own captions: a "
            "folder with a metadata.jsonl, a .jsonl of image / caption lines, or .tar shards (streamed: memory "
            "bounded by --chunk_images)."
        },
    )
    allow_outside_paths: bool = field(default=False, metadata={"help": OUTSIDE_PATHS_HELP})
    noise: float = field(default=0.4, metadata={"help": "Built-in data: the share of captions made wrong."})
    num_images: int = field(default=500, metadata={"help": "Built-in data: images."})
    num_eval_images: int = field(
        default=0,
        metadata={
            "help": "Built-in data: the test images a `vlbridge stage1` run set aside (its --num_eval_images). With "
            "that run's --num_train_images, --captions_per_image, --data_seed_value and --caption_noise as "
            "--num_images, --captions_per_image, --data_seed_value and --noise, the web pairs are its training pairs."
        },
    )
    captions_per_image: int = field(default=1, metadata={"help": "Built-in data: web captions per image."})
    image_size: int = field(default=48, metadata={"help": "Built-in data: image side (as the models were trained)."})
    max_objects: int = field(default=2, metadata={"help": "Built-in data: most objects per scene."})
    data_seed_value: int = field(default=1, metadata={"help": "Built-in data: seed (1: scenes unlike training's)."})
    clean_dataset: str | None = field(
        default=None,
        metadata={
            "help": "First fine-tune copies of the captioner (ITG only) and the filter (ITC + ITM) on clean "
            "captions, as BLIP does on COCO, saved into OUTPUT_DIR/captioner and OUTPUT_DIR/filter and used for "
            "CapFilt: 'builtin' (--clean_images built-in images of --clean_seed_value, none of them a web image), "
            "or a path in the formats --dataset takes. Unset: no fine-tune."
        },
    )
    clean_images: int = field(default=500, metadata={"help": "Built-in clean set: images."})
    clean_captions_per_image: int = field(default=5, metadata={"help": "Built-in clean set: captions per image."})
    clean_seed_value: int = field(
        default=2,
        metadata={"help": "Built-in clean set: seed, other than --data_seed_value (web scenes are left out anyway)."},
    )
    clean_eval_fraction: float = field(
        default=0.1, metadata={"help": "Share of the clean images held out for the metrics before / after."}
    )
    clean_steps: int = field(default=300, metadata={"help": "Fine-tuning steps of each of the two models."})
    clean_learning_rate: float = field(
        default=1e-5, metadata={"help": "Fine-tuning peak learning rate (BLIP's COCO fine-tunes: 1e-5)."}
    )
    clean_batch_size: int = field(
        default=32, metadata={"help": "Fine-tuning batch (ITC / ITM compare the captions of a batch)."}
    )
    num_synthetic: int = field(default=1, metadata={"help": "Synthetic captions per image (BLIP: 1)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling of the synthetic captions (BLIP: 0.9)."})
    max_new_tokens: int = field(default=30, metadata={"help": "Longest synthetic caption."})
    threshold: float = field(default=0.5, metadata={"help": "Kept when the filter's ITM match probability >= this."})
    batch_size: int = field(default=16, metadata={"help": "Images per forward."})
    chunk_images: int = field(
        default=256, metadata={"help": "Images per output shard (the unit of --resume and of what is held)."}
    )
    report_examples: int = field(default=12, metadata={"help": "Example images in report.html (0: counts only)."})
    resume: bool = field(default=False, metadata={"help": "Continue a run in --output_dir with the same settings."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling and of the fine-tunes."})


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
    if args.report_examples < 0:
        raise ValueError(
            f"--report_examples must be >= 0 (0: the report shows the counts only), got {args.report_examples}."
        )
    if args.clean_dataset is not None:
        _check_clean_arguments(args)


def _check_clean_arguments(args: CapFiltArguments) -> None:
    if args.clean_steps < 1:
        raise ValueError(
            f"--clean_steps must be >= 1 (drop --clean_dataset for no fine-tune), got {args.clean_steps}."
        )
    if args.clean_batch_size < 2:
        raise ValueError("--clean_batch_size must be >= 2: ITC and ITM compare the captions of a batch.")
    if args.clean_learning_rate <= 0:
        raise ValueError(f"--clean_learning_rate must be > 0, got {args.clean_learning_rate}.")
    if not 0.0 < args.clean_eval_fraction < 1.0:
        raise ValueError(f"--clean_eval_fraction must be in (0, 1), got {args.clean_eval_fraction}.")
    if args.clean_dataset == "builtin" and args.clean_images < 4:
        raise ValueError(f"--clean_images must be >= 4 (training and held-out images), got {args.clean_images}.")
    if args.clean_dataset == "builtin" and args.dataset == "builtin" and args.clean_seed_value == args.data_seed_value:
        raise ValueError(
            f"--clean_seed_value {args.clean_seed_value} is --data_seed_value: the clean set would be drawn like the "
            "web images; pick another seed."
        )


def load_models(args: CapFiltArguments) -> tuple[CapFiltModel, CapFiltModel]:
    """The captioner and the filter, each checked to be able to do its job ([`load_model`])."""
    return load_model(args.captioner, "captioner"), load_model(args.filter, "filter")


def _changed_settings(settings: dict, recorded: dict) -> list[str]:
    """The settings that differ from a recorded run's; one recorded before a setting existed ran its default."""
    defaults = {name: spec.default for name, spec in CapFiltArguments.__dataclass_fields__.items()}
    return sorted(key for key in settings if recorded.get(key, defaults.get(key)) != settings[key])


def _start_run(args: CapFiltArguments, output: Path, rank: int = 0, poll_seconds: float = 1.0) -> None:
    """Writes the run's settings, or checks them against those of the run in `output` when resuming. Under several
    processes only the first one writes them; the others wait for them and check they run the same settings."""
    settings = {key: value for key, value in asdict(args).items() if key not in _PRESENTATION}
    run_file = output / RUN_FILE
    if rank != 0:
        while not run_file.is_file():
            time.sleep(poll_seconds)
        changed = _changed_settings(settings, json.loads(run_file.read_text()))
        if changed:
            raise ValueError(f"This process runs other settings than the first one: {changed}.")
        return
    if run_file.is_file():
        if not args.resume:
            raise ValueError(f"{output} already holds a CapFilt run: pass --resume to continue it, or another folder.")
        changed = _changed_settings(settings, json.loads(run_file.read_text()))
        if changed:
            raise ValueError(f"--resume with other settings than the run in {output}: {changed}.")
        return
    if output.is_dir() and any(output.iterdir()):
        raise ValueError(f"{output} is not empty and holds no CapFilt run: pick another --output_dir.")
    output.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2))


@torch.no_grad()
def synthetic_captions(captioner: CapFiltModel, images: list, args: CapFiltArguments) -> list[list[str]]:
    """`args.num_synthetic` nucleus-sampled captions per image."""
    if not args.num_synthetic:
        return [[] for _ in images]
    pixel_values = captioner.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ids = captioner.model.generate_captions(
        pixel_values.to(captioner.model.device),
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        top_p=args.top_p,
        num_return_sequences=args.num_synthetic,
    )  # (B * num_synthetic, L)
    texts = captioner.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [texts[i * args.num_synthetic : (i + 1) * args.num_synthetic] for i in range(len(images))]


@torch.no_grad()
def match_probabilities(filter_: CapFiltModel, images: list, texts: list[list[str]]) -> list[list[float]]:
    """The filter's ITM match probability of every (image, text) pair, texts tokenized as in stage-1 training."""
    model = filter_.model
    pixel_values = filter_.image_processor(images=images, return_tensors="pt")["pixel_values"]
    vision = model.get_vision_features(pixel_values.to(model.device))  # (B, P, Dv)
    owners = [i for i, row in enumerate(texts) for _ in row]
    flat = [text for row in texts for text in row]
    if not flat:
        return [[] for _ in texts]
    tokens = ImageTextCollator(filter_.image_processor, filter_.tokenizer).tokenize(flat)
    logits = model.compute_itm_logits(
        vision[owners], tokens["input_ids"].to(model.device), tokens["attention_mask"].to(model.device)
    )  # (pairs, 2)
    probabilities = logits.float().softmax(dim=-1)[:, 1].tolist()
    out, at = [], 0
    for row in texts:
        out.append(probabilities[at : at + len(row)])
        at += len(row)
    return out


def process_chunk(
    captioner: CapFiltModel, filter_: CapFiltModel, groups: list[ImageGroup], args: CapFiltArguments, skipped: list
) -> list[dict]:
    """
    The output rows of one chunk of images: every web caption and every synthetic one, scored and decided.

    Args:
        captioner, filter_ ([`~vlbridge.scripts.capfilt_models.CapFiltModel`]): The two models.
        groups (`list[tuple[int, list[dict]]]`): The chunk's images, each its id and its rows (undecoded `image`,
            `caption`, and `noisy` / `noise_kind` when the data has them); each image is decoded once, here.
        args ([`CapFiltArguments`]): Sampling, batch size and threshold.
        skipped (`list`): Gets `{"image_id", "error"}` for each image that does not decode.

    Returns:
        `list[dict]`: `image` (decoded), `image_id`, `text`, `source`, `itm_score`, `kept`, `noisy`, `noise_kind`.
    """
    rows = []
    for start in range(0, len(groups), args.batch_size):
        batch, images = [], []
        for image_id, records in groups[start : start + args.batch_size]:
            # The image is decoded once, here; an image's web captions are its rows' captions.
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


def _shard_path(output: Path, number: int) -> Path:
    return output / f"shard-{number:05d}.parquet"


def _run_chunk(
    captioner: CapFiltModel,
    filter_: CapFiltModel,
    groups: list[ImageGroup],
    number: int,
    output: Path,
    args: CapFiltArguments,
) -> None:
    """Filters one chunk and writes its shard, with its skipped images beside it."""
    # Each chunk samples from its own seed: a resumed run writes what an uninterrupted one would have.
    torch.manual_seed(args.seed * 100_003 + number)
    skipped: list[dict] = []
    rows = process_chunk(captioner, filter_, groups, args, skipped)
    shard = _shard_path(output, number)
    # The skipped images of a chunk are recorded beside it, before the shard, so that a resumed run counts them.
    shard.with_suffix(".skipped.json").write_text(json.dumps(skipped))
    _write_shard(rows, shard)


def run_chunks(
    captioner: CapFiltModel,
    filter_: CapFiltModel,
    chunks: ImageChunks,
    output: Path,
    args: CapFiltArguments,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """
    Filters this process's chunks (every `world_size`-th, from `rank`) whose shard is not written yet, one chunk in
    memory at a time.

    Args:
        captioner, filter_ ([`~vlbridge.scripts.capfilt_models.CapFiltModel`]): The two models.
        chunks ([`~vlbridge.scripts.capfilt_data.ImageChunks`]): The web images.
        output (`Path`): The output folder.
        args ([`CapFiltArguments`]): The run's arguments.
        rank, world_size (`int`, *optional*): This process and the number of processes.

    Returns:
        `int`: The number of chunks of the whole data (shards `0 .. n - 1`).
    """
    bar = tqdm(total=chunks.num_chunks, desc="CapFilt chunks")

    def wanted(number: int) -> bool:  # written by the run being resumed, or another process's
        return number % world_size == rank and not _shard_path(output, number).is_file()

    for number, groups in chunks.iter_wanted(wanted):
        _run_chunk(captioner, filter_, groups, number, output, args)
        # The name would hold this chunk's rows while the next chunk is read: let them go first.
        del groups
        bar.update(number + 1 - bar.n)
    bar.update(chunks.num_chunks - bar.n)
    bar.close()
    return chunks.num_chunks


def _wait_for(shards: list[Path], world_size: int, poll_seconds: float = 2.0) -> None:
    """The first process summarises once every process has written its shards (no process group needed)."""
    missing = [shard for shard in shards if not shard.is_file()]
    if missing and world_size > 1:
        print(f"waiting for the other processes' {len(missing)} shard(s)...", flush=True)
    while missing:
        time.sleep(poll_seconds)
        missing = [shard for shard in missing if not shard.is_file()]


def summarize(shards: list[Path]) -> dict:
    """Kept / dropped per source and, where the web captions carry `noisy`, the filter's precision and recall; the
    shards are read three columns at a time, one shard at a time."""
    import pyarrow.parquet as pq

    counts = dict.fromkeys(("web_kept", "web_dropped", "synthetic_kept", "synthetic_dropped"), 0)
    dropped_noisy = dropped = noisy = known = 0
    for shard in shards:
        table = pq.read_table(shard, columns=["source", "kept", "noisy"])
        for source, kept, row_noisy in zip(*(table.column(name).to_pylist() for name in ("source", "kept", "noisy"))):
            counts[f"{source}_{'kept' if kept else 'dropped'}"] += 1
            if source == "web" and row_noisy is not None:
                known += 1
                dropped, noisy = dropped + (not kept), noisy + row_noisy
                dropped_noisy += (not kept) and row_noisy
    summary: dict = dict(counts)
    if known:
        summary["filter_precision"] = dropped_noisy / dropped if dropped else math.nan
        summary["filter_recall"] = dropped_noisy / noisy if noisy else math.nan
    return summary


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        if not isinstance(value, dict):
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    for role, record in summary.get("clean_finetune", {}).items():
        changes = ", ".join(
            f"{key} {value:.3f} -> {record['after'][key]:.3f}"
            for key, value in record["before"].items()
            if isinstance(value, float)
        )
        print(f"{role} fine-tuned on the clean set, held out: {changes}")


def main(args: CapFiltArguments) -> ScriptResult:
    """
    Runs CapFilt on the parsed arguments (what [`make_parser`] returns).

    Returns:
        [`~vlbridge.scripts.utils.ScriptResult`]: the summary (kept / dropped per source, the filter's precision and
        recall on the built-in noisy data, skipped images, the clean fine-tune's held-out metrics) and the output
        folder.

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
    web = load_web_data(args)
    # Bad clean data is refused before the output folder is touched.
    clean = load_clean_data(args, web) if args.clean_dataset is not None else None
    # Under `accelerate launch` / torchrun each process takes every world_size-th chunk; the shards are the merge.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    _start_run(args, output, rank)
    finetuned = {}
    if clean is not None:
        finetuned = finetune_models(args, {"captioner": captioner, "filter": filter_}, clean, output, rank)
        # Loaded back from disk, fresh or resumed alike: every process filters with the saved weights.
        captioner = load_model(finetuned["captioner"]["path"], "captioner")
        filter_ = load_model(finetuned["filter"]["path"], "filter")
    chunks = ImageChunks(web, args.chunk_images)
    num_chunks = run_chunks(captioner, filter_, chunks, output, args, rank, world_size)
    if rank != 0:
        return ScriptResult({}, str(output))
    shards = [_shard_path(output, number) for number in range(num_chunks)]
    _wait_for(shards, world_size)
    skipped = [item for shard in shards for item in json.loads(shard.with_suffix(".skipped.json").read_text())]
    summary = {**summarize(shards), "skipped_images": len(skipped)}
    if chunks.report is not None:  # tar samples without a usable image or caption, skipped while streaming
        summary["skipped_samples"] = chunks.report.num_skipped
    if finetuned:
        summary["clean_finetune"] = finetuned
    (output / SUMMARY_FILE).write_text(json.dumps({**summary, "skipped": skipped}, indent=2))
    write_report(output, shards, summary, asdict(args), args.report_examples)
    _print_summary(summary)
    return ScriptResult(summary, str(output))


__all__ = ["CapFiltArguments", "load_models", "main", "make_parser"]


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(sys.argv[1:]))
