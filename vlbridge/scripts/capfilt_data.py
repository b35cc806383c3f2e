"""
The web side of `vlbridge capfilt`: the (image, caption) pairs to filter, and the chunks of images they are processed
and written in.

Two sources give the same chunks. The built-in data, a folder with a `metadata.jsonl`, a `.jsonl` or a CapFilt output
folder are `datasets.Dataset`s (memory-mapped Arrow, so their size is bounded by disk, not memory); an image's rows
are grouped by `image_id` wherever they sit. `.tar` shards are streamed instead: one pass over the shards as plain
rows ([`~vlbridge.data.shards.iter_image_text_shards`]), an image being its consecutive rows (one tar sample), so that
at most one chunk of rows is held at a time. Chunks are numbered in reading order on both, so `--resume` and the
processes of a multi-process run pick the same chunks whichever the source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..data import make_synthetic_image_text
from ..data.shards import ShardRows
from ..data.synthetic_noisy import add_caption_noise
from ..data.user import is_shard_dataset, load_user_dataset, stream_user_shards


if TYPE_CHECKING:
    from datasets import Dataset

    from ..data import LoadReport
    from .capfilt import CapFiltArguments

# An image of a chunk: its id and its rows (`image` undecoded, `caption`, `image_id`, and any other column).
ImageGroup = tuple[int, list[dict]]


def builtin_web_pairs(args: CapFiltArguments) -> Dataset:
    """
    The built-in captions with `args.noise` of them made wrong (`noisy`, `noise_kind`): the filter's test.

    Args:
        args ([`~vlbridge.scripts.capfilt.CapFiltArguments`]): `num_images`, `num_eval_images`, `image_size`,
            `captions_per_image`, `max_objects`, `data_seed_value` and `noise`.
    """
    # The test split is drawn first and the training split avoids its scenes, as in `vlbridge stage1`.
    splits = {"train": args.num_images, **({"test": args.num_eval_images} if args.num_eval_images else {})}
    clean = make_synthetic_image_text(
        splits,
        image_size=args.image_size,
        seed=args.data_seed_value,
        captions_per_image=args.captions_per_image,
        max_objects=args.max_objects,
    )["train"]
    return add_caption_noise(clean, args.noise, seed=args.data_seed_value)


def load_web_data(args: CapFiltArguments) -> Dataset | ShardRows:
    """
    The web pairs of `args.dataset`: a `datasets.Dataset` (`image`, `caption`, `image_id`, and `noisy` /
    `noise_kind` on the built-in data), or, for `.tar` shards, a one-pass [`~vlbridge.data.shards.ShardRows`] stream
    checked to hold captions.

    Args:
        args ([`~vlbridge.scripts.capfilt.CapFiltArguments`]): `dataset`, `allow_outside_paths`, and the built-in
            data's settings.
    """
    if args.dataset == "builtin":
        return builtin_web_pairs(args)
    if is_shard_dataset(args.dataset):
        return stream_user_shards(args.dataset, "captions", "vlbridge capfilt")
    pairs = load_user_dataset(args.dataset, "captions", "vlbridge capfilt", args.allow_outside_paths)
    if "image_id" not in pairs.column_names:
        pairs = pairs.add_column("image_id", list(range(len(pairs))))
    return pairs


def _undecoded(pairs: Dataset) -> Dataset:
    """`pairs` with its images left as `{"bytes", "path"}`: a chunk's rows are read without decoding an image per
    caption, and each image is decoded once, where it is used."""
    from datasets import Image

    feature = pairs.features.get("image")
    return pairs.cast_column("image", Image(decode=False)) if isinstance(feature, Image) and feature.decode else pairs


class ImageChunks:
    """
    The web images in chunks of `chunk_images`, numbered in reading order; each chunk becomes one output shard.

    [`iter_wanted`] yields only the chunks asked for, with their rows read; the others are passed over without their
    images being decoded (and, from a stream, without their rows being kept). A streamed chunk is yielded only once
    the first row of the next image has been read (that is how the chunk is known to be complete), so at most one
    chunk of rows plus that row is held, provided the caller lets each chunk go before asking for the next.

    Args:
        data (`datasets.Dataset` or [`~vlbridge.data.shards.ShardRows`]): What [`load_web_data`] returns.
        chunk_images (`int`): Images per chunk.
    """

    def __init__(self, data: Dataset | ShardRows, chunk_images: int):
        self.chunk_images = chunk_images
        self.streamed = isinstance(data, ShardRows)
        self.report: LoadReport | None = data.report if self.streamed else None
        if self.streamed:
            self._stream, self._groups = data, None
            self.num_chunks: int | None = None  # known once the stream has been read through
        else:
            self._pairs = _undecoded(data)
            self._groups = self._image_groups(self._pairs)
            self.num_chunks = -(-len(self._groups) // chunk_images)

    @staticmethod
    def _image_groups(pairs: Dataset) -> list[tuple[int, list[int]]]:
        """`(image_id, row indices)` in the order the images first appear (only the id column is read)."""
        groups: dict[int, list[int]] = {}
        for row, image_id in enumerate(pairs["image_id"]):
            groups.setdefault(image_id, []).append(row)
        return list(groups.items())

    def iter_wanted(self, wanted: Callable[[int], bool]) -> Iterator[tuple[int, list[ImageGroup]]]:
        """
        `(number, images)` for every chunk `number` with `wanted(number)`, in order.

        Args:
            wanted (`Callable[[int], bool]`): Whether to read chunk `number` (False for a chunk whose shard exists,
                or that another process takes).
        """
        if self.streamed:
            yield from self._iter_stream(wanted)
            return
        size = self.chunk_images
        for number in range(self.num_chunks):
            if wanted(number):
                chunk = self._groups[number * size : (number + 1) * size]
                yield number, [(image_id, [self._pairs[row] for row in members]) for image_id, members in chunk]

    def _iter_stream(self, wanted: Callable[[int], bool]) -> Iterator[tuple[int, list[ImageGroup]]]:
        if self._stream is None:
            raise RuntimeError("A tar stream is read once: build another ImageChunks to read it again.")
        rows, self._stream = self._stream.rows, None
        number, count, keep, images = 0, 0, wanted(0), []
        current = None
        for row in rows:
            # A sample's captions are consecutive rows with its image id; a new id starts the next image.
            if count and row["image_id"] == current:
                if keep:
                    images[-1][1].append(row)
                continue
            if count == self.chunk_images:
                if keep:
                    yield number, images
                # Rebinding drops this generator's hold on the chunk just handed over.
                number, count, images = number + 1, 0, []
                keep = wanted(number)
            current, count = row["image_id"], count + 1
            if keep:
                images.append((current, [row]))
        if count:
            if keep:
                yield number, images
            number += 1
        self.num_chunks = number


__all__ = ["ImageChunks", "builtin_web_pairs", "load_web_data"]
