"""
WebDataset-style tar shards, loaded or streamed (a `datasets.IterableDataset`, or plain rows for a consumer that
holds a bounded window of them), and a Trainer callback that reports the images the loaders skipped.

A shard is a tar file (optionally gzip / bz2 / xz compressed) in which the files of one sample are consecutive and
share a key: the member's path up to the first dot of its file name. `000123.jpg` + `000123.txt` is an image and its
caption; `000123.json` instead of (or next to) the `.txt` holds `{"caption": ...}` / `{"captions": [...]}` with an
optional `image_id`, or a chat `{"messages": [...]}` whose image entries take the sample's images in order
(`000123.0.png`, `000123.1.png`, ... when there are several). Other members (`000123.seg.png`, `000123.cls`) are
ignored. Shards are read with the standard library's `tarfile`, so there is no `webdataset` dependency.

Nothing in a shard can stop a run: a sample whose image is missing or does not decode, whose annotation is missing
or malformed, or a shard that ends early (truncated download) is skipped and counted in the `LoadReport`.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback
from transformers.utils import logging

from .local import (
    CAPTION_KEYS,
    LoadReport,
    _caption_features,
    _chat_features,
    _count_image_entries,
    _decode_error,
    _parse_captions,
    _pick,
    normalize_messages,
)
from .synthetic import require_datasets


if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from transformers import TrainerControl, TrainerState, TrainingArguments


logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
# Samples without an `image_id` get one from their shard and position, offset so that they never meet the (small)
# ids written in .json files.
_DERIVED_ID_OFFSET = 1 << 40
_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def _expand_braces(pattern: str) -> list[str]:
    """WebDataset's `shard-{000..099}.tar` ranges, zero padding kept."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match is None:
        return [pattern]
    first, last = match.groups()
    head, tail = pattern[: match.start()], pattern[match.end() :]
    numbers = range(int(first), int(last) + 1)
    return [name for number in numbers for name in _expand_braces(f"{head}{number:0{len(first)}d}{tail}")]


def _resolve_shards(pattern_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    items = [pattern_or_paths] if isinstance(pattern_or_paths, (str, os.PathLike)) else list(pattern_or_paths)
    paths, missing = [], []
    for item in items:
        for pattern in _expand_braces(os.fspath(item)):
            matches = sorted(glob.glob(pattern)) if any(char in pattern for char in "*?[") else [pattern]
            found = [Path(match) for match in matches if Path(match).is_file()]
            paths += found
            missing += [] if found else [pattern]
    # A shard that is not there is a wrong path, not bad data: fail now rather than train on part of the data.
    if missing or not paths:
        raise FileNotFoundError(
            f"No tar shards at {missing or items}; pass paths, a glob or 'shard-{{000..009}}.tar'."
        )
    return paths


def _split_key(name: str) -> tuple[str, str]:
    """`"dir/000123.seg.png"` -> `("dir/000123", "seg.png")`; `("", "")` for files that belong to no sample."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    # Dot files are macOS resource forks (`._000123.jpg`) and the like, not samples.
    if not stem or not extension:
        return "", ""
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _iter_samples(path: Path, report: LoadReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`(key, {extension: bytes})` per sample, reading the shard once from start to end."""
    key, files = "", {}
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                member_key, extension = _split_key(member.name) if member.isfile() else ("", "")
                if not member_key:
                    continue
                if member_key != key and files:
                    yield key, files
                    files = {}
                key = member_key
                files[extension] = archive.extractfile(member).read()
    except _SHARD_ERRORS as error:
        # The sample being read may be cut short, so it goes too; the shards after this one are still read.
        report._skip(f"{path.name} (from {key or 'the start'})", f"shard unreadable: {error}", kind="sample")
        return
    if files:
        yield key, files


def _image_number(extension: str) -> int | None:
    """The image's place in its sample: 0 for `png`, n for `n.png`; None for other members (`txt`, `seg.png`)."""
    number, _, suffix = extension.rpartition(".")
    if suffix not in IMAGE_EXTENSIONS or not (number == "" or number.isdigit()):
        return None
    return int(number or 0)


def _annotation(files: dict[str, bytes], where: str) -> dict:
    """`{"captions": [...]}` or `{"messages": [...]}`, plus `image_id` when given; a `ValueError` if unusable."""
    record = {}
    if "json" in files:
        try:
            record = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"unreadable .json ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f".json must hold an object, got {type(record).__name__}")
    annotation = {"image_id": record.get("image_id")}
    if "messages" in record:
        annotation["messages"] = normalize_messages(record["messages"])
    elif any(record.get(key) not in (None, "", []) for key in CAPTION_KEYS):
        annotation["captions"] = _parse_captions(_pick(record, CAPTION_KEYS, where, "caption"), where)
    elif "txt" in files:
        annotation["captions"] = _parse_captions(files["txt"].decode("utf-8", errors="replace").strip(), where)
    else:
        raise ValueError("no caption: add a .txt, or a .json with 'caption', 'captions' or 'messages'")
    return annotation


def _check_sample(files: dict[str, bytes], images: list[str], where: str, chat: bool) -> dict:
    """The sample's annotation, or a `ValueError` saying why the sample cannot be used."""
    annotation = _annotation(files, where)
    if ("messages" in annotation) != chat:
        kinds = ("chat", "caption") if chat else ("caption", "chat")
        raise ValueError(f"a {kinds[1]} sample among {kinds[0]} samples; keep the two in separate shards")
    wanted = _count_image_entries(annotation["messages"]) if chat else 1
    if len(images) != wanted:
        raise ValueError(f"{len(images)} image files for {wanted} image entries")
    return annotation


def _sample_rows(
    shard: tuple[int, Path], key: str, position: int, files: dict[str, bytes], chat: bool, verify: bool, report
) -> list[dict]:
    """The rows of one sample, or none (counted in `report`) if anything about it is unusable."""
    index, path = shard
    where = f"{path.name}:{key}"
    images = sorted((ext for ext in files if _image_number(ext) is not None), key=_image_number)
    if not images:
        report._skip(where, "missing")
        report.skipped_rows += 1
        return []
    try:
        annotation = _check_sample(files, images, where, chat)
        given_id = annotation["image_id"]
        image_id = _DERIVED_ID_OFFSET + (index << 32) + position if given_id is None else int(given_id)
    except (ValueError, TypeError) as error:
        report._skip(where, str(error).removeprefix(f"{where}: "), kind="sample")
        report.skipped_rows += 1  # the sample's rows are unknown when its annotation is unreadable
        return []
    values = [{"bytes": files[ext], "path": f"{path}/{key}.{ext}"} for ext in images]
    if chat:
        rows = [{"images": values, "messages": annotation["messages"]}]
    else:
        rows = [{"image": values[0], "caption": caption, "image_id": image_id} for caption in annotation["captions"]]
    problems = {ext: _decode_error(io.BytesIO(files[ext])) for ext in images} if verify else {}
    for ext, problem in problems.items():
        if problem is not None:
            report._skip(f"{where}.{ext}", problem)
    if any(problems.values()):
        report.skipped_rows += len(rows)
        return []
    report.num_rows, report.num_images = report.num_rows + len(rows), report.num_images + len(images)
    return rows


def _this_process(num_shards: int) -> tuple[int, str]:
    """How many of the shards this process reads in one pass, and which process it is (for the warning)."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    if info is None:
        return num_shards, ""
    # In a DataLoader worker, `datasets` hands this process every `num_workers`-th shard.
    return len(range(info.id, num_shards, info.num_workers)), f"DataLoader worker {info.id} of {info.num_workers}"


class _ShardStream:
    """
    The generator behind shards, counting what it skips in `report`. `datasets` calls it once per shard, so a pass
    ends when every shard this process reads is done, and a shard opened again starts the next pass.
    """

    def __init__(self, num_shards: int, chat: bool, verify: bool, report: LoadReport):
        self.num_shards, self.chat, self.verify, self.report = num_shards, chat, verify, report
        self._opened: set[int] = set()
        self._closed: set[int] = set()

    def __call__(self, shards: list[tuple[int, str]]) -> Iterator[dict]:
        # `shards` is a list in `gen_kwargs`, so `datasets` can split it between DataLoader workers.
        for index, path in shards:
            if not self._opened or index in self._opened:
                self.report._begin_pass()
                self._opened, self._closed = set(), set()
            self._opened.add(index)
            for position, (key, files) in enumerate(_iter_samples(Path(path), self.report)):
                yield from _sample_rows((index, Path(path)), key, position, files, self.chat, self.verify, self.report)
            self._closed.add(index)
            num_shards, process = _this_process(self.num_shards)
            if len(self._closed) == num_shards:
                self.report._end_pass(process)
                self._opened = set()


def _is_chat(paths: list[Path]) -> bool:
    """Whether the first sample with an annotation is a chat: the shards' kind, without reading them through."""
    scratch = LoadReport("peek")
    for path in paths:
        for _, files in _iter_samples(path, scratch):
            if "json" in files:
                try:
                    return "messages" in json.loads(files["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
                    continue
            if "txt" in files:
                return False
    return False


@dataclass
class ShardRows:
    """
    One pass over tar shards as plain rows, in shard order, without `datasets` (what [`iter_image_text_shards`]
    returns): nothing is read before `rows` is iterated, and each row is dropped as soon as the caller lets it go.

    Args:
        rows (`Iterator[dict]`): `{"image", "caption", "image_id"}` rows, or `{"images", "messages"}` for chats; an
            image is an undecoded `{"bytes": ..., "path": ...}` value (what `datasets.Image(decode=False)` holds).
        chat (`bool`): Whether the shards hold chats rather than captions.
        report (`LoadReport`): Filled in as `rows` is read (complete once it is exhausted).
    """

    rows: Iterator[dict]
    chat: bool
    report: LoadReport

    @property
    def column_names(self) -> list[str]:
        """The keys of every row, as `load_image_text_shards`' columns."""
        return list((_chat_features() if self.chat else _caption_features()).keys())


def _open_shards(
    pattern_or_paths: str | os.PathLike | Iterable[str | os.PathLike], verify_images: bool
) -> tuple[_ShardStream, list[tuple[int, str]], bool, LoadReport]:
    """The stream, its `gen_kwargs` shards, whether they hold chats, and the report it fills in."""
    paths = _resolve_shards(pattern_or_paths)
    chat = _is_chat(paths)
    report = LoadReport(", ".join(path.name for path in paths[:3]) + (", ..." if len(paths) > 3 else ""))
    stream = _ShardStream(len(paths), chat, verify_images, report)
    return stream, [(index, os.fspath(path)) for index, path in enumerate(paths)], chat, report


def iter_image_text_shards(
    pattern_or_paths: str | os.PathLike | Iterable[str | os.PathLike], verify_images: bool = False
) -> ShardRows:
    """
    One pass over WebDataset-style tar shards as plain Python rows, for a consumer that holds only a bounded window
    of them (`vlbridge capfilt` holds one output chunk): the same samples, rows, image ids and skipped-sample
    counting as [`load_image_text_shards`], read by the same generator, but with no `datasets` layer in between, so
    that nothing buffers rows behind the caller's back and images stay undecoded until the caller decodes them.

    Args:
        pattern_or_paths (`str`, `os.PathLike` or a list of them):
            Shard paths, globs or brace ranges, as [`load_image_text_shards`] takes them.
        verify_images (`bool`, *optional*, defaults to `False`):
            Decode every image once as it is read and skip unreadable ones (counted in the report). Off by default:
            a consumer that skips rows (a resumed run) should not pay for their decoding, and one that decodes
            them anyway can count what fails itself.

    Returns:
        [`ShardRows`]: the row iterator, whether the shards hold chats, and the live `LoadReport`.

    Raises:
        `FileNotFoundError`: if a path, glob or range names no file.
    """
    stream, shards, chat, report = _open_shards(pattern_or_paths, verify_images)
    return ShardRows(stream(shards), chat, report)


def load_image_text_shards(
    pattern_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
    streaming: bool = False,
    verify_images: bool = True,
    return_report: bool = False,
) -> Dataset | IterableDataset | tuple[Dataset | IterableDataset, LoadReport]:
    """
    Load WebDataset-style tar shards of images with captions or chats.

    Samples are the members of a shard that share a key (`000123.jpg` + `000123.txt` or `000123.json`; see the
    module docstring). The first sample with an annotation decides whether the shards hold captions or chats.
    Samples whose image is missing or unreadable, whose annotation is missing or malformed, or that do not match
    their images (a chat's image entries against its image files, one image per caption sample) are skipped and
    counted in the report, as are the unread rest of a shard that ends early. Samples without an `image_id` in
    their .json get `2**40 + shard_index * 2**32 + position_in_shard`.

    Args:
        pattern_or_paths (`str`, `os.PathLike` or a list of them):
            Shard paths, globs (`"data/*.tar"`) or brace ranges (`"data/shard-{000..099}.tar"`); read in order.
        streaming (`bool`, *optional*, defaults to `False`):
            Return a `datasets.IterableDataset` that reads the shards and decodes images only as rows are read,
            for data larger than memory; with `False` every sample's bytes are held in memory. A warning at the end
            of each pass sums up what was skipped.
        verify_images (`bool`, *optional*, defaults to `True`):
            Decode every image once so unreadable ones are skipped rather than raising when their row is read.
        return_report (`bool`, *optional*, defaults to `False`):
            Also return the `LoadReport` (live during streaming; pass it to `SkippedImagesCallback`).

    Returns:
        A `datasets.Dataset` (or `IterableDataset`) with columns `image`, `caption`, `image_id` (like
        `load_image_text_folder`), or `images` and `messages` for chats; `(dataset, report)` with
        `return_report=True`.

    Raises:
        `FileNotFoundError`: if a path, glob or range names no file.

    Example:

    ```python
    >>> import io, tarfile, tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from vlbridge.data import load_image_text_shards
    >>> shard = Path(tempfile.mkdtemp()) / "shard-000.tar"
    >>> png = io.BytesIO()
    >>> Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    >>> members = {"0001.png": png.getvalue(), "0001.txt": b"a red square", "0002.png": b"not a png", "0002.txt": b"?"}
    >>> with tarfile.open(shard, "w") as archive:
    ...     for name, data in members.items():
    ...         info = tarfile.TarInfo(name)
    ...         info.size = len(data)
    ...         archive.addfile(info, io.BytesIO(data))
    >>> stream, report = load_image_text_shards(shard, streaming=True, return_report=True)
    >>> [row["caption"] for row in stream], list(report.corrupt)
    (['a red square'], ['shard-000.tar:0002.png'])
    ```
    """
    stream, shards, chat, report = _open_shards(pattern_or_paths, verify_images)
    features = _chat_features() if chat else _caption_features()
    datasets = require_datasets()
    if streaming:
        dataset = datasets.IterableDataset.from_generator(stream, features=features, gen_kwargs={"shards": shards})
    else:
        dataset = datasets.Dataset.from_list(list(stream(shards)), features=features)
    return (dataset, report) if return_report else dataset


# ------------------------------------------------------------------------------------------ Trainer callback


class SkippedImagesCallback(TrainerCallback):
    """
    Reports the images the loaders skipped while a `transformers.Trainer` runs.

    At every log it adds `skipped_images` (the total over `reports`) to the logs, which the progress bar prints, and
    to `state.log_history`, which `trainer_state.json` keeps; it warns whenever the total has grown since its last
    warning, and at the end of training it logs each report's `summary()`. Reporting integrations (W&B, TensorBoard)
    run before the callbacks passed to the Trainer, so they get the count only with this callback moved to the
    front: `trainer.callback_handler.callbacks.insert(0, callback)`.

    Streamed data is counted where it is read: with `dataloader_num_workers > 0` each worker process counts in its
    own copy of the report and logs its own summary at the end of its pass, and the counts here stay at zero (a
    warning says so at the start of training).

    Args:
        *reports (`LoadReport`):
            The reports returned by the loaders (`return_report=True`), e.g. of the train and eval data.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> from vlbridge.data import LoadReport, SkippedImagesCallback
    >>> report = LoadReport("train.jsonl", num_rows=9, num_images=9, missing=["a.png"], skipped_rows=1)
    >>> callback = SkippedImagesCallback(report)
    >>> state, logs = SimpleNamespace(log_history=[{"loss": 1.0, "step": 10}], global_step=10), {"loss": 1.0}
    >>> _ = callback.on_log(None, state, None, logs=logs)
    >>> logs, state.log_history
    ({'loss': 1.0, 'skipped_images': 1}, [{'loss': 1.0, 'step': 10, 'skipped_images': 1}])
    ```

    With the Trainer:

    ```python
    train_dataset, report = load_image_text_shards("data/shard-{000..099}.tar", streaming=True, return_report=True)
    trainer = Trainer(model, args, train_dataset=train_dataset, callbacks=[SkippedImagesCallback(report)])
    ```
    """

    log_key = "skipped_images"

    def __init__(self, *reports: LoadReport):
        if not reports:
            raise ValueError("Pass the LoadReport(s) the loaders returned with return_report=True.")
        self.reports = reports
        self._warned_at = 0

    @property
    def num_skipped(self) -> int:
        """Images skipped over all reports (in the current pass, for streamed data)."""
        return sum(report.num_skipped for report in self.reports)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Warn if streamed data will be read in DataLoader workers, out of this callback's sight."""
        # A report that has not finished a pass belongs to data that is still to be streamed.
        if getattr(args, "dataloader_num_workers", 0) > 0 and any(report.passes == 0 for report in self.reports):
            logger.warning(
                f"dataloader_num_workers={args.dataloader_num_workers}: streamed images are read in worker "
                "processes, whose skipped-image counts do not reach SkippedImagesCallback; each worker logs its own "
                "summary at the end of its pass."
            )

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kwargs
    ) -> TrainerControl:
        """Add the skipped-image count to `logs` and `state.log_history`; warn when it has grown."""
        skipped = self.num_skipped
        if logs is not None:
            logs[self.log_key] = skipped
        # The Trainer has already stored this log's copy, which is what trainer_state.json keeps.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][self.log_key] = skipped
        if skipped > self._warned_at:
            summaries = " | ".join(report.summary() for report in self.reports if report.num_skipped)
            logger.warning(f"{skipped - self._warned_at} more images skipped ({skipped} in all): {summaries}")
            self._warned_at = skipped
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Log every report's summary."""
        for report in self.reports:
            (logger.warning if report.num_skipped else logger.info)(f"At the end of training: {report.summary()}")
        return control


__all__ = ["ShardRows", "SkippedImagesCallback", "iter_image_text_shards", "load_image_text_shards"]
