"""
Local image-text data: a folder of images with a `metadata.jsonl` (like `datasets`' imagefolder) or a jsonl of image
paths and captions, loaded into the columns of the built-in synthetic data (`image`, `caption`, `image_id`).

Missing or unreadable images are skipped, but never silently: they are counted in a `LoadReport` and a warning names
the first few.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from transformers.utils import logging

from .synthetic import require_datasets


if TYPE_CHECKING:
    from datasets import Dataset


logger = logging.get_logger(__name__)

IMAGE_KEYS = ("file_name", "image", "image_path", "path")
CAPTION_KEYS = ("text", "caption", "captions")
_NAMES_IN_WARNING = 5
# PIL raises these for unreadable files: UnidentifiedImageError / truncated data are OSErrors, some plugins raise
# SyntaxError or ValueError, and oversized images raise DecompressionBombError.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class LoadReport:
    """
    What a local loader kept and what it skipped.

    Args:
        source (`str`): The metadata file that was read.
        num_rows (`int`): (image, caption) rows kept.
        num_images (`int`): Distinct images kept.
        missing (`list[str]`): Image paths (as written in the metadata) that do not exist.
        corrupt (`dict[str, str]`): Image paths that exist but could not be decoded, with the reason.
        skipped_rows (`int`): Caption rows dropped with those images.

    Example:

    ```python
    >>> from vlbridge.data import LoadReport
    >>> report = LoadReport("metadata.jsonl", num_rows=4, num_images=2, missing=["b.png"], skipped_rows=1)
    >>> report.num_skipped
    1
    ```
    """

    source: str
    num_rows: int = 0
    num_images: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)
    skipped_rows: int = 0

    @property
    def num_skipped(self) -> int:
        """Images skipped (missing + corrupt)."""
        return len(self.missing) + len(self.corrupt)

    def summary(self) -> str:
        problems = [f"{name} (missing)" for name in self.missing]
        problems += [f"{name} (unreadable: {reason})" for name, reason in self.corrupt.items()]
        shown = "; ".join(problems[:_NAMES_IN_WARNING]) + ("; ..." if len(problems) > _NAMES_IN_WARNING else "")
        return (
            f"Skipped {self.num_skipped} of {self.num_images + self.num_skipped} images listed in {self.source} "
            f"({len(self.missing)} missing, {len(self.corrupt)} unreadable; {self.skipped_rows} caption rows "
            f"dropped): {shown}"
        )


def _check_image(path: Path, verify: bool) -> str | None:
    """None if the image can be used, else why not ("missing" or the decoding error)."""
    if not path.is_file():
        return "missing"
    if not verify:
        return None
    try:
        with Image.open(path) as image:
            # `verify()` misses truncated data in some formats; a full decode is the reliable check.
            image.load()
    except _IMAGE_ERRORS as error:
        return f"{type(error).__name__}: {error}"
    return None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
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
            records.append((line_number, record))
    return records


def _pick(record: dict, keys: tuple[str, ...], line_number: int, source: Path, what: str):
    for key in keys:
        if record.get(key) not in (None, "", []):
            return record[key]
    raise ValueError(f"Line {line_number} of {source} has no {what}: give one of the keys {list(keys)}.")


def _assign_image_ids(files: list[str], given: dict[str, int]) -> dict[str, int]:
    """Keep ids from the metadata; number the other images after the largest given id, in order of appearance."""
    next_id = max(given.values(), default=-1) + 1
    ids = dict(given)
    for name in files:
        if name not in ids:
            ids[name], next_id = next_id, next_id + 1
    return ids


def _build_dataset(
    records: list[tuple[int, dict]],
    source: Path,
    image_keys: tuple[str, ...],
    caption_keys: tuple[str, ...],
    verify_images: bool,
) -> tuple[Dataset, LoadReport]:
    datasets = require_datasets()
    base = source.parent
    pairs: list[tuple[str, str]] = []
    given_ids: dict[str, int] = {}
    for line_number, record in records:
        name = str(_pick(record, image_keys, line_number, source, "image path"))
        captions = _pick(record, caption_keys, line_number, source, "caption")
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not all(isinstance(caption, str) and caption.strip() for caption in captions):
            raise ValueError(f"Line {line_number} of {source}: captions must be non-empty strings, got {captions!r}.")
        if record.get("image_id") is not None:
            image_id = int(record["image_id"])
            if given_ids.setdefault(name, image_id) != image_id:
                raise ValueError(f"{name} has two image ids in {source}: {given_ids[name]} and {image_id}.")
        pairs += [(name, caption) for caption in captions]

    files = list(dict.fromkeys(name for name, _ in pairs))
    ids = _assign_image_ids(files, given_ids)
    report = LoadReport(str(source))
    usable = {}
    for name in files:
        problem = _check_image(base / name, verify_images)
        if problem == "missing":
            report.missing.append(name)
        elif problem is not None:
            report.corrupt[name] = problem
        usable[name] = problem is None
    kept = [(name, caption) for name, caption in pairs if usable[name]]
    report.num_rows, report.num_images = len(kept), sum(usable.values())
    report.skipped_rows = len(pairs) - len(kept)
    if report.num_skipped:
        logger.warning(report.summary())

    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "image_id": datasets.Value("int64")}
    )
    columns = {
        "image": [{"path": os.fspath(base / name), "bytes": None} for name, _ in kept],
        "caption": [caption for _, caption in kept],
        "image_id": [ids[name] for name, _ in kept],
    }
    return datasets.Dataset.from_dict(columns, features=features), report


def load_image_text_folder(
    path: str | os.PathLike,
    metadata_file: str = "metadata.jsonl",
    verify_images: bool = True,
    return_report: bool = False,
) -> Dataset | tuple[Dataset, LoadReport]:
    """
    Load a folder of images described by a `metadata.jsonl`, the layout of `datasets`' imagefolder.

    Each line of the metadata is a JSON object with `file_name` (relative to the folder), the caption as `text` or
    `caption` (a string, or a list of strings for several captions of one image), and optionally `image_id`
    (images without one are numbered after the largest given id). Missing or unreadable images are skipped, counted
    in the report and named in a warning; malformed metadata lines raise a `ValueError` naming the line.

    Args:
        path (`str` or `os.PathLike`):
            The folder.
        metadata_file (`str`, *optional*, defaults to `"metadata.jsonl"`):
            The metadata file's name inside the folder.
        verify_images (`bool`, *optional*, defaults to `True`):
            Decode every image once so unreadable files are caught now rather than mid-training. With `False` only
            missing files are skipped.
        return_report (`bool`, *optional*, defaults to `False`):
            Also return the `LoadReport` (rows and images kept, files skipped and why).

    Returns:
        `datasets.Dataset` with columns `image` (`datasets.Image()`, stored as file paths), `caption` (`string`) and
        `image_id` (`int64`), one row per (image, caption) pair like `make_synthetic_image_text`; or
        `(dataset, report)` with `return_report=True`.

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
    ```
    """
    folder = Path(path)
    metadata = folder / metadata_file
    if not metadata.is_file():
        raise FileNotFoundError(
            f"No {metadata_file} in {folder}: write one JSON line per image, e.g. "
            '{"file_name": "0001.png", "text": "a red circle"}.'
        )
    dataset, report = _build_dataset(_read_jsonl(metadata), metadata, IMAGE_KEYS, CAPTION_KEYS, verify_images)
    return (dataset, report) if return_report else dataset


def load_image_text_jsonl(
    path: str | os.PathLike,
    image_key: str | None = None,
    caption_key: str | None = None,
    verify_images: bool = True,
    return_report: bool = False,
) -> Dataset | tuple[Dataset, LoadReport]:
    """
    Load a jsonl file of image paths and captions: `{"image": "imgs/1.jpg", "caption": "a dog"}` per line.

    Image paths are absolute or relative to the jsonl file's folder. By default the image path is read from the
    first present key of `file_name`, `image`, `image_path`, `path`, and the caption from `text`, `caption`,
    `captions` (a string or a list of strings). Missing or unreadable images are skipped, counted in the report and
    named in a warning.

    Args:
        path (`str` or `os.PathLike`):
            The jsonl file.
        image_key (`str`, *optional*):
            The key holding the image path, if not one of the defaults.
        caption_key (`str`, *optional*):
            The key holding the caption(s), if not one of the defaults.
        verify_images (`bool`, *optional*, defaults to `True`):
            Decode every image once so unreadable files are caught now; with `False` only missing files are skipped.
        return_report (`bool`, *optional*, defaults to `False`):
            Also return the `LoadReport`.

    Returns:
        `datasets.Dataset` with columns `image`, `caption`, `image_id` (see `load_image_text_folder`); or
        `(dataset, report)` with `return_report=True`.

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
    ```
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; pass a .jsonl file of image paths and captions.")
    image_keys = (image_key,) if image_key else IMAGE_KEYS
    caption_keys = (caption_key,) if caption_key else CAPTION_KEYS
    dataset, report = _build_dataset(_read_jsonl(source), source, image_keys, caption_keys, verify_images)
    return (dataset, report) if return_report else dataset


__all__ = ["LoadReport", "load_image_text_folder", "load_image_text_jsonl"]
