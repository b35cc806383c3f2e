"""
Interleaved image-text sequences in OpenFlamingo's layout: several (image, caption) chunks in one text,
`"<image>caption<|endofchunk|><image>caption<|endofchunk|>..."`, with the sequence's `images` in marker order.

- `interleave_pairs` lays out any image-caption pairs (built-in or `--dataset`) as such sequences;
- `make_synthetic_interleaved` does it for the built-in captions of `vlbridge.data.synthetic`, so a sequence's scenes
  are exactly the ones `make_synthetic_image_text` draws with the same arguments (evaluation splits drawn first,
  no scene shared between splits).

A model trained on these sequences can be prompted with in-context examples before a query image (Flamingo's few-shot
captioning, `vlbridge.evaluation.evaluate_few_shot`). The chunks of one sequence show unrelated scenes: an earlier
chunk tells nothing about a later image, only what a caption looks like.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from .synthetic import make_synthetic_image_text, require_datasets
from .tokenizer import END_OF_CHUNK_TOKEN


if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, Features


DEFAULT_IMAGE_TOKEN = "<image>"


def interleaved_features() -> Features:
    """The `datasets.Features` of interleaved sequences: `images`, `text`, `captions` and `image_ids`."""
    datasets = require_datasets()
    return datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "text": datasets.Value("string"),
            "captions": datasets.List(datasets.Value("string")),
            "image_ids": datasets.List(datasets.Value("int64")),
        }
    )


def interleave_pairs(
    pairs: Dataset,
    num_pairs: int = 4,
    seed: int | str = 0,
    image_token: str = DEFAULT_IMAGE_TOKEN,
    end_of_chunk_token: str = END_OF_CHUNK_TOKEN,
) -> Dataset:
    """
    Lays out image-caption pairs as interleaved sequences of `num_pairs` (image, caption) chunks, rendered as
    `"{image_token}caption{end_of_chunk_token}"` one after the other (OpenFlamingo's LAION / MMC4 text layout).

    Every pair is used once. An image with several captions comes back once per caption, in different sequences: the
    pairs are laid out in rounds (round r holds one caption, not yet used, of every image that has one, drawn at
    random), each round shuffled and cut into sequences, so one sequence never shows an image twice. The last
    sequence of a round may be shorter. Images are not decoded.

    Args:
        pairs (`datasets.Dataset`):
            One row per (image, caption) pair: `image`, `caption` and, when an image has several captions,
            `image_id` (rows without it are each their own image).
        num_pairs (`int`, *optional*, defaults to 4):
            (image, caption) chunks per sequence.
        seed (`int` or `str`, *optional*, defaults to 0):
            Seeds the order of the pairs; the same seed gives the same sequences.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The processor's image token (`processor.image_token`), one marker per image.
        end_of_chunk_token (`str`, *optional*, defaults to `"<|endofchunk|>"`):
            Ends each chunk; the tokenizer must know it as one token
            (`build_word_tokenizer(..., end_of_chunk_token=True)`).

    Returns:
        `datasets.Dataset`: one row per sequence, with the columns of [`interleaved_features`]:
        `images` (the images, in marker order), `text`, `captions` (each chunk's caption) and `image_ids`.

    Example:

    ```python
    >>> from vlbridge.data import interleave_pairs, make_synthetic_image_text
    >>> pairs = make_synthetic_image_text({"train": 4}, captions_per_image=2)["train"]
    >>> sequences = interleave_pairs(pairs, num_pairs=4)
    >>> sequences.num_rows, len(sequences[0]["images"]), sequences[0]["text"].count("<image>")
    (2, 4, 4)
    >>> sequences[0]["text"].startswith("<image>") and sequences[0]["text"].endswith("<|endofchunk|>")
    True
    ```
    """
    if num_pairs < 1:
        raise ValueError(f"`num_pairs` must be at least 1 (image, caption) chunk per sequence, got {num_pairs}.")
    missing = [column for column in ("image", "caption") if column not in pairs.column_names]
    if missing:
        raise ValueError(f"interleave_pairs needs `image` and `caption` columns; {missing} missing.")
    datasets = require_datasets()
    # The image cells as stored ({"bytes", "path"}), without decoding and re-encoding them.
    cells = pairs.cast_column("image", datasets.Image(decode=False))["image"]
    captions = [caption.strip() if isinstance(caption, str) else caption for caption in pairs["caption"]]
    image_ids = list(pairs["image_id"]) if "image_id" in pairs.column_names else list(range(len(captions)))
    for row, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption:
            raise ValueError(f"Pair {row} has no caption (got {caption!r}): filter out rows without text.")
        if image_token in caption or end_of_chunk_token in caption:
            raise ValueError(
                f"Pair {row}'s caption holds {image_token!r} or {end_of_chunk_token!r} ({caption!r}): the chunks "
                "would no longer line up with the images. Remove those strings from the captions."
            )
    by_image: dict[int, list[int]] = {}
    for row, image_id in enumerate(image_ids):
        by_image.setdefault(image_id, []).append(row)
    rng = random.Random(f"vlbridge-interleaved:{seed}")
    # Each image's captions in a random order, so a round mixes caption styles (the built-in data lists the full
    # description first: unshuffled, round 0 would hold nothing else).
    for rows in by_image.values():
        rng.shuffle(rows)
    columns: dict[str, list] = {key: [] for key in ("images", "text", "captions", "image_ids")}
    for round_ in range(max((len(rows) for rows in by_image.values()), default=0)):
        round_rows = [rows[round_] for rows in by_image.values() if len(rows) > round_]
        rng.shuffle(round_rows)
        for start in range(0, len(round_rows), num_pairs):
            chunk = round_rows[start : start + num_pairs]
            columns["images"].append([cells[row] for row in chunk])
            columns["text"].append("".join(f"{image_token}{captions[row]}{end_of_chunk_token}" for row in chunk))
            columns["captions"].append([captions[row] for row in chunk])
            columns["image_ids"].append([image_ids[row] for row in chunk])
    return datasets.Dataset.from_dict(columns, features=interleaved_features())


def make_synthetic_interleaved(
    num_images_per_split: dict[str, int] | None = None,
    num_pairs: int = 4,
    image_size: int = 64,
    seed: int = 0,
    captions_per_image: int = 3,
    max_objects: int = 4,
    image_token: str = DEFAULT_IMAGE_TOKEN,
    end_of_chunk_token: str = END_OF_CHUNK_TOKEN,
) -> DatasetDict:
    """
    A deterministic interleaved dataset: the built-in captions of `make_synthetic_image_text` (same arguments, so the
    same images and captions) laid out by [`interleave_pairs`] as sequences of `num_pairs` (image, caption) chunks,
    `"<image>caption<|endofchunk|><image>caption<|endofchunk|>..."`.

    Each split holds `captions_per_image * num_images / num_pairs` sequences (rounded up per round), every pair of the
    split once. As in `make_synthetic_image_text`, each split draws its scenes from its own random stream, evaluation
    splits first, so growing `"train"` never changes them, and no scene appears in two splits.

    Args:
        num_images_per_split (`dict[str, int]`, *optional*):
            Images per split; defaults to `{"train": 1000, "validation": 100, "test": 100}`.
        num_pairs (`int`, *optional*, defaults to 4):
            (image, caption) chunks per sequence.
        image_size (`int`, *optional*, defaults to 64):
            Image width and height in pixels (at least 24).
        seed (`int`, *optional*, defaults to 0):
            Seed of the scenes, captions and sequence order.
        captions_per_image (`int`, *optional*, defaults to 3):
            Captions per image (1 to 5); each appears in one sequence.
        max_objects (`int`, *optional*, defaults to 4):
            The most objects in an image (1 to 9).
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The processor's image token (`processor.image_token`).
        end_of_chunk_token (`str`, *optional*, defaults to `"<|endofchunk|>"`):
            Ends each chunk (`build_word_tokenizer(..., end_of_chunk_token=True)` knows it).

    Returns:
        `datasets.DatasetDict`: the requested splits, one row per sequence (columns of [`interleaved_features`]).

    Example:

    ```python
    >>> from vlbridge.data import make_synthetic_interleaved
    >>> data = make_synthetic_interleaved({"train": 8, "test": 4}, num_pairs=4, captions_per_image=1)
    >>> data["train"].num_rows, sorted(data["test"][0]["image_ids"])  # ids as make_synthetic_image_text numbers them
    (2, [8, 9, 10, 11])
    >>> row = data["train"][0]
    >>> len(row["images"]) == row["text"].count("<image>") == row["text"].count("<|endofchunk|>") == 4
    True
    ```
    """
    pairs = make_synthetic_image_text(
        num_images_per_split,
        image_size=image_size,
        seed=seed,
        captions_per_image=captions_per_image,
        max_objects=max_objects,
    )
    datasets = require_datasets()
    options = {"num_pairs": num_pairs, "image_token": image_token, "end_of_chunk_token": end_of_chunk_token}
    return datasets.DatasetDict(
        {name: interleave_pairs(split, seed=f"{seed}:{name}", **options) for name, split in pairs.items()}
    )


__all__ = ["DEFAULT_IMAGE_TOKEN", "interleave_pairs", "interleaved_features", "make_synthetic_interleaved"]
