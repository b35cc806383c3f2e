"""
The `--dataset` of the training commands: a folder, a `.jsonl` or `.tar` shards of captions or chats, or a `.jsonl`
of preference rows, loaded with the loaders of this package and checked to hold what the command trains on.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers.utils import logging

from .local import check_paths_inside, load_image_text_folder, load_image_text_jsonl, normalize_messages
from .shards import ShardRows, iter_image_text_shards, load_image_text_shards


logger = logging.get_logger(__name__)


# What each kind of `--dataset` holds, in the words of `--help` and of the error a dataset of another kind gets.
DATASET_COLUMNS = {
    "captions": ("image", "caption"),
    "chats": ("images", "messages"),
    "preferences": ("images", "prompt", "chosen", "rejected"),
}

DATASET_FORMATS = {
    "captions": 'a folder of images with a metadata.jsonl ({"file_name": "1.png", "text": "a red circle"} per '
    'line), a .jsonl of {"image": "1.png", "caption": "..."} lines, .tar shards (a path or a brace pattern), or '
    "the output folder of vlbridge capfilt (its kept captions)",
    "chats": 'a folder with a metadata.jsonl, a .jsonl or .tar shards whose rows hold a chat: {"images": ["1.png"], '
    '"messages": [{"role": "user", "content": "<image> what is it?"}, {"role": "assistant", "content": "..."}]}',
    "preferences": 'a .jsonl of preference rows as TRL\'s DPOTrainer takes them: {"images": ["1.png"], "prompt": '
    '"<image> what is it?", "chosen": "a red circle", "rejected": "a blue star"} (strings, or lists of chat '
    "messages); image paths are relative to the file",
}


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


# The file `vlbridge capfilt` writes into its output folder beside its shards.
CAPFILT_RUN_FILE = "capfilt_run.json"


def load_capfilt_output(folder: str | os.PathLike):
    """
    The captions `vlbridge capfilt` kept, as a caption dataset for the next pretraining round: its parquet shards'
    `kept` rows, `text` as `caption`, with their `source` (web / synthetic) and `itm_score`. The dropped rows stay in
    the shards with their scores; the count of each is logged.

    Args:
        folder (`str` or `os.PathLike`): A `vlbridge capfilt` output folder.

    Returns:
        `datasets.Dataset` with `image`, `caption`, `image_id`, `source`, `itm_score`.
    """
    from datasets import Dataset

    shards = sorted(Path(folder).glob("shard-*.parquet"))
    if not shards:
        raise FileNotFoundError(
            f"{folder} holds a CapFilt run but no shard: let it finish, or rerun it with --resume."
        )
    data = Dataset.from_parquet([str(shard) for shard in shards])
    kept = data.filter(lambda row: row["kept"])
    logger.info(f"CapFilt output {folder}: {len(kept)} captions kept, {len(data) - len(kept)} dropped by the filter.")
    kept = kept.rename_column("text", "caption")
    return kept.select_columns(["image", "caption", "image_id", "source", "itm_score"])


def is_shard_dataset(path: str | os.PathLike) -> bool:
    """
    Whether a `--dataset` names tar shards (a `.tar` path, a glob or a brace range) rather than a folder or a
    `.jsonl`: the one rule [`load_user_dataset`] and [`stream_user_shards`] share.

    Example:

    ```python
    >>> from vlbridge.data.user import is_shard_dataset
    >>> is_shard_dataset("data/shard-{000..009}.tar"), is_shard_dataset("captions.jsonl")
    (True, False)
    ```
    """
    text = str(path)
    if Path(text).is_dir() or Path(text).suffix == ".jsonl":
        return False
    return Path(text).suffix == ".tar" or any(mark in text for mark in "*{[")


def _check_columns(columns: list[str], kind: str, text: str, command: str) -> None:
    expected = DATASET_COLUMNS[kind]
    if not set(expected) <= set(columns):
        raise ValueError(
            f"{command} takes {kind} (columns {', '.join(expected)}); {text} holds columns {', '.join(columns)}."
        )


def stream_user_shards(path: str | os.PathLike, kind: str, command: str) -> ShardRows:
    """
    A `--dataset` of tar shards as one pass of plain rows ([`~vlbridge.data.shards.iter_image_text_shards`]), for a
    command that processes data larger than memory a bounded window at a time; checked, before any row is read, to
    be of the `kind` the command takes. Images stay undecoded (`{"bytes", "path"}`) and unverified.

    Args:
        path (`str` or `os.PathLike`): The shards (see [`is_shard_dataset`]).
        kind (`str`): `"captions"` or `"chats"` (see `DATASET_COLUMNS`).
        command (`str`): The command, for the error (`"vlbridge capfilt"`).

    Returns:
        [`~vlbridge.data.shards.ShardRows`]

    Raises:
        `ValueError`: One line naming the columns `command` expects, when the shards hold the other kind.
    """
    shards = iter_image_text_shards(str(path))
    _check_columns(shards.column_names, kind, str(path), command)
    return shards


def load_user_dataset(path: str | os.PathLike, kind: str, command: str, allow_outside_paths: bool = False):
    """
    A `--dataset` given on the command line, loaded as `vlbridge stage1 --dataset` loads it (a folder with a
    `metadata.jsonl`: `load_image_text_folder`; a `.jsonl`: `load_image_text_jsonl`; `.tar` shards:
    `load_image_text_shards`; a `.jsonl` of preference rows: [`load_preference_jsonl`]), and checked to be of the
    `kind` the command trains on.

    Args:
        path (`str` or `os.PathLike`): The dataset.
        kind (`str`): `"captions"`, `"chats"` or `"preferences"` (see `DATASET_COLUMNS`).
        command (`str`): The command, for the error (`"vlbridge sft"`).
        allow_outside_paths (`bool`, *optional*, defaults to `False`): Accept image paths that leave the dataset's
            folder (see `load_image_text_folder`).

    Returns:
        `datasets.Dataset` with the columns of `DATASET_COLUMNS[kind]` (and any others the loader gives).

    Raises:
        `ValueError`: One line naming the columns `command` expects, when the data is of another kind.

    Example:

    ```python
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from vlbridge.data.user import load_user_dataset
    >>> folder = Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8), "red").save(folder / "1.png")
    >>> _ = (folder / "captions.jsonl").write_text(json.dumps({"image": "1.png", "caption": "a red square"}) + "\\n")
    >>> load_user_dataset(folder / "captions.jsonl", "captions", "vlbridge stage1").column_names
    ['image', 'caption', 'image_id']
    >>> load_user_dataset(folder / "captions.jsonl", "chats", "vlbridge sft")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: vlbridge sft takes chats (columns images, messages); ... holds columns image, caption, image_id.
    ```
    """
    expected = DATASET_COLUMNS[kind]
    source = Path(path)
    text = str(path)
    if source.is_dir() and (source / CAPFILT_RUN_FILE).is_file():
        dataset = load_capfilt_output(source)
    elif source.is_dir():
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
    elif is_shard_dataset(text):
        dataset = load_image_text_shards(text)
    else:
        raise FileNotFoundError(
            f"--dataset {text!r} is no folder, .jsonl file or .tar shard: {command} takes {DATASET_FORMATS[kind]}."
        )
    _check_columns(list(dataset.column_names or []), kind, text, command)
    return dataset


__all__ = [
    "DATASET_COLUMNS",
    "DATASET_FORMATS",
    "is_shard_dataset",
    "load_capfilt_output",
    "load_preference_jsonl",
    "load_user_dataset",
    "stream_user_shards",
]
