"""
Local image-text data: a folder of images with a `metadata.jsonl` (like `datasets`' imagefolder) or a jsonl of image
paths with captions (loaded into the columns of the built-in synthetic data: `image`, `caption`, `image_id`) or with
chat messages (loaded into `images` and `messages`, the format TRL's `SFTTrainer` takes for VLMs).

Missing or unreadable images are skipped, but never silently: they are counted in a `LoadReport` and a warning names
the first few. With `streaming=True` images are decoded only as rows are read, and a warning sums up the skipped
ones at the end of each pass. Tar shards and the Trainer callback that logs the report are in `vlbridge.data.shards`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, TYPE_CHECKING, NamedTuple

from PIL import Image
from transformers.utils import logging

from .synthetic import require_datasets


if TYPE_CHECKING:
    from datasets import Dataset, Features, IterableDataset


logger = logging.get_logger(__name__)

IMAGE_KEYS = ("file_name", "image", "image_path", "path")
CAPTION_KEYS = ("text", "caption", "captions")
IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
_NAMES_IN_WARNING = 5
# PIL raises these for unreadable files: UnidentifiedImageError / truncated data are OSErrors, some plugins raise
# SyntaxError or ValueError, and oversized images raise DecompressionBombError.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Keys with which transformers' chat format lets an image entry carry its own source; here the sources are the
# record's image list, so such an entry would be ambiguous.
_IMAGE_SOURCE_KEYS = ("image", "path", "url", "base64")


@dataclass
class LoadReport:
    """
    What a local loader kept and what it skipped.

    A streamed dataset fills its report in as it is read: each pass starts a fresh count (an image that fails every
    epoch counts once), a warning with `summary()` ends every pass, and an image listed twice counts twice.

    Args:
        source (`str`): The metadata file or shards that were read.
        num_rows (`int`): Rows kept.
        num_images (`int`): Images kept.
        missing (`list[str]`): Image paths (as written in the metadata) that do not exist, or tar samples without an
            image.
        corrupt (`dict[str, str]`): Images that exist but could not be decoded, with the reason.
        skipped_rows (`int`): Rows dropped with those images.
        invalid (`dict[str, str]`): Tar samples (or shards) dropped for bad annotations (or data), with the reason.
        passes (`int`): Passes over the data completed (1 once a non-streaming loader returns).

    Example:

    ```python
    >>> from vlbridge.data import LoadReport
    >>> report = LoadReport("metadata.jsonl", num_rows=4, num_images=2, missing=["b.png"], skipped_rows=1)
    >>> report.num_skipped
    1
    >>> report.summary()
    'Skipped 1 of 3 images listed in metadata.jsonl (1 missing, 0 unreadable; 1 rows dropped): b.png (missing)'
    ```
    """

    source: str
    num_rows: int = 0
    num_images: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)
    skipped_rows: int = 0
    invalid: dict[str, str] = field(default_factory=dict)
    passes: int = 0
    # Names already counted in the current pass, so that an image listed on several lines is counted once.
    _counted: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    @property
    def num_skipped(self) -> int:
        """Images (or tar samples) skipped: missing + corrupt + invalid."""
        return len(self.missing) + len(self.corrupt) + len(self.invalid)

    def summary(self) -> str:
        """One line: how many images were skipped and why, naming the first few."""
        if not self.num_skipped:
            return f"Kept all {self.num_images} images listed in {self.source} ({self.num_rows} rows)."
        problems = [f"{name} (missing)" for name in self.missing]
        problems += [f"{name} (unreadable: {reason})" for name, reason in self.corrupt.items()]
        problems += [f"{name} (invalid: {reason})" for name, reason in self.invalid.items()]
        shown = "; ".join(problems[:_NAMES_IN_WARNING]) + ("; ..." if len(problems) > _NAMES_IN_WARNING else "")
        counts = f"{len(self.missing)} missing, {len(self.corrupt)} unreadable"
        counts += f", {len(self.invalid)} invalid" if self.invalid else ""
        return (
            f"Skipped {self.num_skipped} of {self.num_images + self.num_skipped} images listed in {self.source} "
            f"({counts}; {self.skipped_rows} rows dropped): {shown}"
        )

    def _begin_pass(self) -> None:
        self.num_rows = self.num_images = self.skipped_rows = 0
        self.missing, self.corrupt, self.invalid, self._counted = [], {}, {}, set()

    def _skip(self, name: str, problem: str, kind: str = "image") -> None:
        """Count `name` once per pass: `problem` is "missing" or the reason; `kind="sample"` files it as invalid."""
        if name in self._counted:
            return
        self._counted.add(name)
        if kind == "sample":
            self.invalid[name] = problem
        elif problem == "missing":
            self.missing.append(name)
        else:
            self.corrupt[name] = problem

    def _end_pass(self, process: str = "") -> None:
        self.passes += 1
        message = f"End of pass {self.passes} over the data{f' ({process})' if process else ''}: {self.summary()}"
        (logger.warning if self.num_skipped else logger.info)(message)


def _decode_error(source: str | os.PathLike | IO[bytes]) -> str | None:
    """None if PIL decodes the image, else the error."""
    try:
        with Image.open(source) as image:
            # `verify()` misses truncated data in some formats; a full decode is the reliable check.
            image.load()
    except _IMAGE_ERRORS as error:
        # PIL names an in-memory source by its repr ("<_io.BytesIO object at 0x...>"), which says nothing.
        message = str(error) if isinstance(source, (str, os.PathLike)) else str(error).replace(f" {source!r}", "")
        return f"{type(error).__name__}: {message}"
    return None


def _check_image(path: Path, verify: bool) -> str | None:
    """None if the image can be used, else why not ("missing" or the decoding error)."""
    if not path.is_file():
        return "missing"
    return _decode_error(path) if verify else None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                message = f"Line {line_number} of {path} is not valid JSON ({error}); fix or remove it."
                raise ValueError(message) from None
            if not isinstance(record, dict):
                raise ValueError(f"Line {line_number} of {path} must be a JSON object, got {type(record).__name__}.")
            yield line_number, record


def _pick(record: dict, keys: tuple[str, ...], where: str, what: str):
    for key in keys:
        if record.get(key) not in (None, "", []):
            return record[key]
    raise ValueError(f"{where} has no {what}: give one of the keys {list(keys)}.")


# ------------------------------------------------------------------------------------------ chat messages


def _content_entries(content, image_token: str, where: str) -> list[dict]:
    if isinstance(content, str):
        # "<image>\nWhat colour?" -> image, "What colour?": whitespace touching a placeholder is dropped, because
        # chat templates already put each image on its own line.
        parts = content.split(image_token)
        entries = []
        for index, part in enumerate(parts):
            if index > 0:
                entries.append({"type": "image"})
                part = part.lstrip()
            part = part.rstrip() if index < len(parts) - 1 else part
            if part:
                entries.append({"type": "text", "text": part})
        return entries
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of entries, got {type(content).__name__}.")
    entries = []
    for entry in content:
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind == "image":
            if any(entry.get(key) is not None for key in _IMAGE_SOURCE_KEYS):
                raise ValueError(f"{where}: list image files in the record's `images`, not in entries ({entry}).")
            entries.append({"type": "image"})
        elif kind == "text" and isinstance(entry.get("text"), str):
            if image_token in entry["text"]:
                raise ValueError(f"{where}: a text entry holds {image_token!r}; use {{'type': 'image'}} entries.")
            entries.append({"type": "text", "text": entry["text"]})
        else:
            raise ValueError(
                f"{where}: content entries are {{'type': 'image'}} or {{'type': 'text', 'text': str}}, got {entry!r}."
            )
    return entries


def normalize_messages(messages: list[dict], image_token: str = IMAGE_TOKEN) -> list[dict]:
    """
    Check a chat and bring every `content` to the list-of-entries form that chat templates and TRL take.

    A string content becomes `{"type": "text", "text": ...}` entries with a `{"type": "image"}` entry for each
    `image_token` in it, in order (whitespace next to a placeholder is dropped). A list content is kept, reduced to
    `{"type": "image"}` and `{"type": "text", "text": ...}` entries. Roles are `system` (optional, first only), then
    `user` and `assistant` taking turns, starting with `user`. Other keys of a message are dropped.

    Args:
        messages (`list[dict]`):
            The chat: dicts with `role` and `content`.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The placeholder that marks an image inside string content.

    Returns:
        `list[dict]`: New messages `{"role": ..., "content": [entries]}`.

    Raises:
        `ValueError`: naming the message, for unknown roles, roles out of turn, or malformed content.

    Example:

    ```python
    >>> from vlbridge.data import normalize_messages
    >>> messages = [{"role": "user", "content": "<image>\\nWhat colour?"}, {"role": "assistant", "content": "Red."}]
    >>> normalize_messages(messages)[0]["content"]
    [{'type': 'image'}, {'type': 'text', 'text': 'What colour?'}]
    ```
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}.")
    normalized = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict) or "content" not in message:
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {message!r}.")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; roles are {list(ROLES)}.")
        previous = normalized[-1]["role"] if normalized else None
        expected = {None: ("system", "user"), "system": ("user",), "user": ("assistant",), "assistant": ("user",)}
        if role not in expected[previous]:
            raise ValueError(
                f"{where} has role {role!r} after {previous or 'the start'}: a system message may come first, then "
                "user and assistant messages take turns, starting with user."
            )
        normalized.append({"role": role, "content": _content_entries(message["content"], image_token, where)})
    return normalized


def _count_image_entries(messages: list[dict]) -> int:
    return sum(entry["type"] == "image" for message in messages for entry in message["content"])


# ------------------------------------------------------------------------------------------ records and datasets


class _Caption(NamedTuple):
    name: str
    captions: list[str]
    image_id: int | None


class _Chat(NamedTuple):
    names: list[str]
    messages: list[dict]


def _parse_captions(value, where: str) -> list[str]:
    captions = value if isinstance(value, list) else [value]
    if not all(isinstance(caption, str) and caption.strip() for caption in captions):
        raise ValueError(f"{where}: captions must be non-empty strings, got {value!r}.")
    return captions


def check_paths_inside(names: list[str], base: str | os.PathLike, where: str) -> None:
    """Raise unless every image path stays inside the dataset folder `base`, as image paths are documented to.

    Checked on the normalised text of the path (`..` climbing out, or an absolute path elsewhere), symlinks left
    unresolved: an image folder linked into the dataset folder counts as inside, while a metadata line cannot reach
    any file it likes. An absolute path that names a file inside the folder is fine.
    """
    folder = os.path.normpath(os.path.abspath(base))
    for name in names:
        if PurePath(name).anchor:
            relative = os.path.relpath(os.path.normpath(name), folder) if os.path.isabs(name) else os.pardir
        else:
            relative = os.path.normpath(name)
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            raise ValueError(
                f"{where}: the image path {name!r} leaves the dataset folder (image paths are relative to it). "
                "Move the image into the folder, or pass allow_outside_paths=True (--allow_outside_paths on the "
                "command line) if you trust the metadata."
            )


def _parse_record(record: dict, where: str, image_keys: tuple[str, ...], caption_keys: tuple[str, ...]):
    """A `_Chat` for records with `messages`, else a `_Caption`; a `ValueError` naming `where` if malformed."""
    if "messages" not in record:
        name = str(_pick(record, image_keys, where, "image path"))
        captions = _parse_captions(_pick(record, caption_keys, where, "caption"), where)
        image_id = record.get("image_id")
        return _Caption(name, captions, None if image_id is None else int(image_id))
    # A chat may have several images (`images`) or one under the caption records' keys, or none (text only).
    keys = ("images", *image_keys)
    names = next((record[key] for key in keys if record.get(key) not in (None, "", [])), [])
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{where}: the images must be a path or a list of paths, got {names!r}.")
    try:
        messages = normalize_messages(record["messages"])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if _count_image_entries(messages) != len(names):
        raise ValueError(
            f"{where}: the messages have {_count_image_entries(messages)} image entries ({IMAGE_TOKEN!r} or "
            f"{{'type': 'image'}}) but the record lists {len(names)} images; they must match one to one, in order."
        )
    return _Chat(names, messages)


def _parse_all(
    lines: Iterator[tuple[int, dict]],
    source: Path,
    image_keys: tuple[str, ...],
    caption_keys: tuple[str, ...],
    allow_outside_paths: bool = False,
) -> Iterator[_Caption | _Chat]:
    """Parse records in order; all must be of the kind of the first (captions or chats)."""
    kind = None
    for line_number, record in lines:
        where = f"Line {line_number} of {source}"
        parsed = _parse_record(record, where, image_keys, caption_keys)
        if not allow_outside_paths:
            check_paths_inside(parsed.names if isinstance(parsed, _Chat) else [parsed.name], source.parent, where)
        kind = kind or type(parsed)
        if type(parsed) is not kind:
            raise ValueError(f"{where} mixes captions and chats (`messages`) in one file; keep them apart.")
        yield parsed


def _caption_features() -> Features:
    """`image` (`datasets.Image()`), `caption` (`string`), `image_id` (`int64`), as in the built-in data."""
    datasets = require_datasets()
    return datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "image_id": datasets.Value("int64")}
    )


def _chat_features() -> Features:
    """`images` (a list of `datasets.Image()`) and `messages` (role + content entries), TRL's VLM format."""
    datasets = require_datasets()
    string = datasets.Value("string")
    message = {"role": string, "content": datasets.List({"type": string, "text": string})}
    return datasets.Features({"images": datasets.List(datasets.Image()), "messages": datasets.List(message)})


def _image_path(base: Path, name: str) -> Path:
    # Opened as normalised, the path `_check_inside` checked: the OS would resolve `..` after a symlinked folder
    # from the link's target ("pics/../x.png" leaving the dataset when `pics` links elsewhere).
    return base / os.path.normpath(name)


def _image_value(path: Path) -> dict:
    # A path, not a PIL image: `datasets` would re-encode a PIL image to PNG bytes.
    return {"path": os.fspath(path), "bytes": None}


def _assign_image_ids(files: list[str], given: dict[str, int]) -> dict[str, int]:
    """Keep ids from the metadata; number the other images after the largest given id, in order of appearance."""
    next_id = max(given.values(), default=-1) + 1
    ids = dict(given)
    for name in files:
        if name not in ids:
            ids[name], next_id = next_id, next_id + 1
    return ids


def _check_files(names: list[str], base: Path, verify: bool, report: LoadReport) -> dict[str, bool]:
    usable = {}
    for name in names:
        problem = _check_image(_image_path(base, name), verify)
        if problem is not None:
            report._skip(name, problem)
        usable[name] = problem is None
    return usable


def _build_caption_dataset(records: list[_Caption], source: Path, verify: bool) -> tuple[Dataset, LoadReport]:
    base = source.parent
    given_ids: dict[str, int] = {}
    for record in records:
        if record.image_id is not None and given_ids.setdefault(record.name, record.image_id) != record.image_id:
            raise ValueError(
                f"{record.name} has two image ids in {source}: {given_ids[record.name]} and {record.image_id}."
            )
    pairs = [(record.name, caption) for record in records for caption in record.captions]
    files = list(dict.fromkeys(name for name, _ in pairs))
    ids = _assign_image_ids(files, given_ids)
    report = LoadReport(str(source))
    usable = _check_files(files, base, verify, report)
    kept = [(name, caption) for name, caption in pairs if usable[name]]
    report.num_rows, report.num_images = len(kept), sum(usable.values())
    report.skipped_rows = len(pairs) - len(kept)
    columns = {
        "image": [_image_value(_image_path(base, name)) for name, _ in kept],
        "caption": [caption for _, caption in kept],
        "image_id": [ids[name] for name, _ in kept],
    }
    return require_datasets().Dataset.from_dict(columns, features=_caption_features()), report


def _build_chat_dataset(records: list[_Chat], source: Path, verify: bool) -> tuple[Dataset, LoadReport]:
    base = source.parent
    report = LoadReport(str(source))
    usable = _check_files(
        list(dict.fromkeys(name for record in records for name in record.names)), base, verify, report
    )
    # A chat loses its row if any of its images is bad: dropping one image would break the image/entry pairing.
    kept = [record for record in records if all(usable[name] for name in record.names)]
    report.num_rows, report.num_images = len(kept), sum(usable.values())
    report.skipped_rows = len(records) - len(kept)
    columns = {
        "images": [[_image_value(_image_path(base, name)) for name in record.names] for record in kept],
        "messages": [record.messages for record in kept],
    }
    return require_datasets().Dataset.from_dict(columns, features=_chat_features()), report


def _load_eager(
    source: Path, image_keys, caption_keys, verify: bool, allow_outside_paths: bool
) -> tuple[Dataset, LoadReport]:
    records = list(_parse_all(_iter_jsonl(source), source, image_keys, caption_keys, allow_outside_paths))
    if records and isinstance(records[0], _Chat):
        dataset, report = _build_chat_dataset(records, source, verify)
    else:
        dataset, report = _build_caption_dataset(records, source, verify)
    report.passes = 1
    if report.num_skipped:
        logger.warning(report.summary())
    return dataset, report


# ------------------------------------------------------------------------------------------ streaming


class _JsonlStream:
    """
    The generator behind a streamed folder or jsonl: each call is one pass that re-reads the metadata, checks each
    image just before its rows are yielded and counts what it skips in `report`. Images without an `image_id` are
    numbered after the largest given id per line, not per file name (that would hold every name in memory).
    """

    def __init__(
        self,
        source: Path,
        image_keys,
        caption_keys,
        verify: bool,
        report: LoadReport,
        next_id: int,
        allow_outside_paths: bool = False,
    ):
        self.source, self.image_keys, self.caption_keys = source, image_keys, caption_keys
        self.verify, self.report, self.next_id = verify, report, next_id
        self.allow_outside_paths = allow_outside_paths

    def __call__(self) -> Iterator[dict]:
        report, base, next_id = self.report, self.source.parent, self.next_id
        report._begin_pass()
        records = _parse_all(
            _iter_jsonl(self.source), self.source, self.image_keys, self.caption_keys, self.allow_outside_paths
        )
        for record in records:
            if isinstance(record, _Chat):
                if not all(_check_files(record.names, base, self.verify, report).values()):
                    report.skipped_rows += 1
                    continue
                report.num_rows, report.num_images = report.num_rows + 1, report.num_images + len(record.names)
                yield {
                    "images": [_image_value(_image_path(base, name)) for name in record.names],
                    "messages": record.messages,
                }
                continue
            image_id = record.image_id
            if image_id is None:
                image_id, next_id = next_id, next_id + 1
            if not _check_files([record.name], base, self.verify, report)[record.name]:
                report.skipped_rows += len(record.captions)
                continue
            report.num_rows, report.num_images = report.num_rows + len(record.captions), report.num_images + 1
            for caption in record.captions:
                yield {"image": _image_value(_image_path(base, record.name)), "caption": caption, "image_id": image_id}
        report._end_pass()


def _load_streaming(
    source: Path, image_keys, caption_keys, verify: bool, allow_outside_paths: bool
) -> tuple[IterableDataset, LoadReport]:
    # One pass over the metadata now, holding nothing, so a malformed line (or a path leaving the folder) fails here
    # and not hours into training.
    kind, next_id = None, 0
    for record in _parse_all(_iter_jsonl(source), source, image_keys, caption_keys, allow_outside_paths):
        kind = kind or type(record)
        if isinstance(record, _Caption) and record.image_id is not None:
            next_id = max(next_id, record.image_id + 1)
    report = LoadReport(str(source))
    stream = _JsonlStream(source, image_keys, caption_keys, verify, report, next_id, allow_outside_paths)
    features = _chat_features() if kind is _Chat else _caption_features()
    return require_datasets().IterableDataset.from_generator(stream, features=features), report


def load_image_text_folder(
    path: str | os.PathLike,
    metadata_file: str = "metadata.jsonl",
    verify_images: bool = True,
    return_report: bool = False,
    streaming: bool = False,
    allow_outside_paths: bool = False,
) -> Dataset | IterableDataset | tuple[Dataset | IterableDataset, LoadReport]:
    """
    Load a folder of images described by a `metadata.jsonl`, the layout of `datasets`' imagefolder.

    Each line of the metadata is a JSON object with `file_name` (relative to the folder, and inside it unless
    `allow_outside_paths=True`) and either a caption or a chat. A caption is `text` or `caption` (a string, or a list
    of strings for several captions of one image), with an optional `image_id` (images without one are numbered after
    the largest given id). A chat is `messages` (see `normalize_messages`) with `file_name` or `images` (a list)
    holding as many images as the messages have image entries. Missing or unreadable images are skipped, counted in
    the report and named in a warning; malformed metadata lines raise a `ValueError` naming the line, at load time,
    streaming or not.

    Args:
        path (`str` or `os.PathLike`):
            The folder.
        metadata_file (`str`, *optional*, defaults to `"metadata.jsonl"`):
            The metadata file's name inside the folder.
        verify_images (`bool`, *optional*, defaults to `True`):
            Decode every image once so unreadable files are caught (and skipped) before a row uses them. With `False`
            only missing files are skipped, and an unreadable one raises when its row is read.
        return_report (`bool`, *optional*, defaults to `False`):
            Also return the `LoadReport` (rows and images kept, files skipped and why). When streaming, it is the live
            report of the pass in progress (or the last one).
        streaming (`bool`, *optional*, defaults to `False`):
            Return a `datasets.IterableDataset` that checks and decodes images only as rows are read, for data larger
            than memory. A warning at the end of each pass sums up what was skipped; see `SkippedImagesCallback` to
            log it from the Trainer. The metadata is one shard to `datasets`, so one DataLoader worker reads it: use
            tar shards (`load_image_text_shards`) to spread decoding over workers.
        allow_outside_paths (`bool`, *optional*, defaults to `False`):
            Accept image paths that leave the folder (absolute, or climbing out with `..`). Off by default, so a
            metadata file cannot read images from anywhere on the machine: such a path raises a `ValueError` naming
            its line, at load time (streaming too). Symlinks are not resolved, so a linked image folder is inside.

    Returns:
        A `datasets.Dataset` (or `IterableDataset`) with columns `image` (`datasets.Image()`, stored as file paths),
        `caption` (`string`) and `image_id` (`int64`), one row per (image, caption) pair like
        `make_synthetic_image_text`; for chats, `images` (a list of `datasets.Image()`) and `messages`, one row per
        chat. `(dataset, report)` with `return_report=True`.

    Example:

    ```python
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from vlbridge.data import load_image_text_folder
    >>> folder = Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8), "red").save(folder / "red.png")
    >>> lines = [{"file_name": "red.png", "text": "a red square"}, {"file_name": "gone.png", "text": "a cat"}]
    >>> _ = (folder / "metadata.jsonl").write_text("\\n".join(json.dumps(line) for line in lines))
    >>> dataset, report = load_image_text_folder(folder, return_report=True)
    >>> dataset[0]["caption"], dataset[0]["image_id"], report.missing
    ('a red square', 0, ['gone.png'])
    >>> stream, report = load_image_text_folder(folder, streaming=True, return_report=True)
    >>> [row["caption"] for row in stream], report.missing, report.passes
    (['a red square'], ['gone.png'], 1)
    ```
    """
    folder = Path(path)
    metadata = folder / metadata_file
    if not metadata.is_file():
        raise FileNotFoundError(
            f"No {metadata_file} in {folder}: write one JSON line per image, e.g. "
            '{"file_name": "0001.png", "text": "a red circle"}.'
        )
    load = _load_streaming if streaming else _load_eager
    dataset, report = load(metadata, IMAGE_KEYS, CAPTION_KEYS, verify_images, allow_outside_paths)
    return (dataset, report) if return_report else dataset


def load_image_text_jsonl(
    path: str | os.PathLike,
    image_key: str | None = None,
    caption_key: str | None = None,
    verify_images: bool = True,
    return_report: bool = False,
    streaming: bool = False,
    allow_outside_paths: bool = False,
) -> Dataset | IterableDataset | tuple[Dataset | IterableDataset, LoadReport]:
    """
    Load a jsonl file of image paths with captions or chats: `{"image": "imgs/1.jpg", "caption": "a dog"}` or
    `{"images": ["imgs/1.jpg"], "messages": [{"role": "user", "content": "<image>\\nWhat is it?"}, ...]}` per line.

    Image paths are relative to the jsonl file's folder and must stay inside it; absolute paths and paths that climb
    out of it (`../`) need `allow_outside_paths=True`. By default the image path is read from the first present key
    of `file_name`, `image`, `image_path`, `path` (chats also take `images`, a list), and the caption from `text`,
    `caption`, `captions` (a string or a list of strings). A file holds captions or chats, not both. Chats are
    checked and normalised by `normalize_messages`, and must have one image entry per listed image. Missing or
    unreadable images are skipped, counted in the report and named in a warning; malformed lines raise a `ValueError`
    naming the line, at load time, streaming or not.

    Args:
        path (`str` or `os.PathLike`):
            The jsonl file.
        image_key (`str`, *optional*):
            The key holding the image path(s), if not one of the defaults.
        caption_key (`str`, *optional*):
            The key holding the caption(s), if not one of the defaults.
        verify_images (`bool`, *optional*, defaults to `True`):
            Decode every image once so unreadable files are caught (and skipped) before a row uses them; with `False`
            only missing files are skipped.
        return_report (`bool`, *optional*, defaults to `False`):
            Also return the `LoadReport` (live during streaming).
        streaming (`bool`, *optional*, defaults to `False`):
            Return a `datasets.IterableDataset` that decodes images only as rows are read (see
            `load_image_text_folder`).
        allow_outside_paths (`bool`, *optional*, defaults to `False`):
            Accept absolute image paths and relative ones that leave the jsonl file's folder (`..`); without it they
            raise a `ValueError` naming the line, at load time (streaming too). Symlinks are not resolved.

    Returns:
        A `datasets.Dataset` (or `IterableDataset`) with columns `image`, `caption`, `image_id`, or `images`,
        `messages` for chats (see `load_image_text_folder`); or `(dataset, report)` with `return_report=True`.

    Example:

    ```python
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from vlbridge.data import load_image_text_jsonl
    >>> folder = Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8), "blue").save(folder / "blue.png")
    >>> line = {"image": "blue.png", "captions": ["a blue square", "blue"], "image_id": 7}
    >>> _ = (folder / "pairs.jsonl").write_text(json.dumps(line))
    >>> dataset = load_image_text_jsonl(folder / "pairs.jsonl")
    >>> list(dataset["caption"]), list(dataset["image_id"])
    (['a blue square', 'blue'], [7, 7])
    >>> chat = [{"role": "user", "content": "<image>\\nWhat colour?"}, {"role": "assistant", "content": "Blue."}]
    >>> _ = (folder / "chat.jsonl").write_text(json.dumps({"image": "blue.png", "messages": chat}))
    >>> row = load_image_text_jsonl(folder / "chat.jsonl")[0]
    >>> row["images"][0].size, row["messages"][0]["content"][0]["type"]
    ((8, 8), 'image')
    ```
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; pass a .jsonl file of image paths and captions or chats.")
    image_keys = (image_key,) if image_key else IMAGE_KEYS
    caption_keys = (caption_key,) if caption_key else CAPTION_KEYS
    load = _load_streaming if streaming else _load_eager
    dataset, report = load(source, image_keys, caption_keys, verify_images, allow_outside_paths)
    return (dataset, report) if return_report else dataset


__all__ = [
    "LoadReport",
    "check_paths_inside",
    "load_image_text_folder",
    "load_image_text_jsonl",
    "normalize_messages",
]
