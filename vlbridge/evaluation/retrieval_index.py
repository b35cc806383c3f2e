"""
An on-disk index of a gallery's ITC image embeddings, searched by chunks: retrieval over galleries too large to hold
their `(N, Q, E)` embeddings (and the `(N, M, Q)` similarities) in memory.

Storage: one safetensors file per shard of `shard_size` images (`shard-00000.safetensors`, ...), plus `index.json`.
safetensors rather than a `datasets` Arrow file because a shard is one contiguous `(n, Q, E)` array: `safe_open`
memory-maps it and a slice of rows is a zero-copy torch view, ready for a matmul, whereas Arrow stores a `(Q, E)`
matrix per row as nested lists that have to be flattened (and copied) back into a tensor. A shard is opened for one
pass over its rows and closed after it, so at most one shard's pages are mapped at a time, never the whole index.

Search: for a batch of queries `(b, E)` and a chunk of images `(c, Q, E)`, one matmul gives `(c * Q, b)` cosines,
the max over the `Q` queries gives `(c, b)`, and a running top-k per query is merged with the chunk's scores. The
index is read once per call whatever the number of queries; memory is one chunk of images and one chunk's
similarities for `query_batch_size` queries, plus the `(M, k)` result.

ITM re-ranking needs the vision tower's features `(P, Dv)` of each candidate image. Storing them costs
`P * Dv / (Q * E)` times the embeddings (BLIP-2's EVA ViT: 257 x 1408 against 32 x 256, 44x: 145 GB in float32 for
100k images), so by default they are **recomputed** for the candidates only, from the images the index was built
from (image paths are kept in `index.json`; for in-memory images pass them again). `store_vision_features=True`
keeps them in the shards instead, which suits small galleries and a cheap-to-store tower.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..processing.image_utils import to_rgb_image


INDEX_FORMAT = "vlbridge-embedding-index"
INDEX_VERSION = 1
METADATA_FILE = "index.json"


def merge_topk(
    scores: torch.Tensor, indices: torch.Tensor, new_scores: torch.Tensor, offset: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Merges a chunk's scores into a running top-k: `scores, indices (b, k')` (k' <= k, best first) and `new_scores
    (b, c)` whose column `j` is candidate `offset + j`. Returns the new `(b, min(k, k' + c))` top-k, best first.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge.evaluation.retrieval_index import merge_topk
    >>> scores, indices = torch.empty(1, 0), torch.empty(1, 0, dtype=torch.long)
    >>> scores, indices = merge_topk(scores, indices, torch.tensor([[0.1, 0.9]]), offset=0, k=2)
    >>> merge_topk(scores, indices, torch.tensor([[0.5, 0.2]]), offset=2, k=2)[1].tolist()
    [[1, 2]]
    ```
    """
    new_indices = torch.arange(offset, offset + new_scores.shape[1]).expand_as(new_scores)
    all_scores = torch.cat([scores, new_scores], dim=1)  # (b, k' + c)
    all_indices = torch.cat([indices, new_indices], dim=1)
    top_scores, positions = all_scores.topk(min(k, all_scores.shape[1]), dim=1)
    return top_scores, all_indices.gather(1, positions)


def chunk_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """
    BLIP-2's best-query cosine of a chunk: `image_feats (c, Q, E)`, `text_feats (b, E)` -> `(b, c)`, the transpose of
    `query_text_similarity` computed as one `(c * Q, E) @ (E, b)` matmul.
    """
    num_images, num_queries, dim = image_feats.shape
    cosines = image_feats.reshape(num_images * num_queries, dim).float() @ text_feats.float().t()  # (c * Q, b)
    return cosines.view(num_images, num_queries, -1).amax(dim=1).t()  # (b, c)


def _empty_topk(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(rows, 0), torch.empty(rows, 0, dtype=torch.long)


def topk_texts_per_image(
    image_feats: torch.Tensor, text_feats: torch.Tensor, k: int, text_batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's `k` best texts by best-query cosine: `(c, Q, E)`, `(M, E)` -> scores and indices `(c, k)`;
    texts are taken `text_batch_size` at a time so that the `(c * Q, texts)` cosines stay bounded."""
    scores, indices = _empty_topk(len(image_feats))
    for start in range(0, len(text_feats), text_batch_size):
        similarity = chunk_similarity(image_feats, text_feats[start : start + text_batch_size]).t()  # (c, b)
        scores, indices = merge_topk(scores, indices, similarity, start, k)
    return scores, indices


class EmbeddingIndex:
    r"""
    A gallery's ITC image embeddings `(N, Q, E)` on disk, in safetensors shards, searched chunk by chunk (see the
    module docstring for the layout and the memory it needs). Nothing of the embeddings is held by the object: each
    search maps one shard at a time.

    Args:
        path (`str` or `os.PathLike`):
            The index folder ([`EmbeddingIndex.build`] or [`EmbeddingIndex.write`] made it).

    Example:

    ```python
    >>> import tempfile, torch
    >>> from vlbridge.evaluation.retrieval_index import EmbeddingIndex
    >>> feats = torch.nn.functional.normalize(torch.randn(10, 4, 8), dim=-1)  # 10 images x 4 queries, E = 8
    >>> folder = tempfile.mkdtemp()
    >>> index = EmbeddingIndex.write(folder, [feats[:6], feats[6:]], shard_size=4)
    >>> scores, indices = EmbeddingIndex.open(folder).search(feats[3, :1], k=2, chunk_size=3)
    >>> len(index), indices[0, 0].item()
    (10, 3)
    ```
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        metadata_file = self.path / METADATA_FILE
        if not metadata_file.is_file():
            raise FileNotFoundError(f"{self.path} holds no {METADATA_FILE}: it is not an embedding index.")
        self.metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
        if self.metadata.get("format") != INDEX_FORMAT:
            raise ValueError(f"{metadata_file} is not a {INDEX_FORMAT} file.")
        self.shards: list[dict] = self.metadata["shards"]  # [{"file", "start", "count"}], in image order

    @classmethod
    def open(cls, path: str | os.PathLike) -> EmbeddingIndex:
        """Opens an index written by [`EmbeddingIndex.build`] / [`EmbeddingIndex.write`] (reads only its metadata)."""
        return cls(path)

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether `path` holds an index."""
        return Path(path, METADATA_FILE).is_file()

    def __len__(self) -> int:
        return int(self.metadata["num_images"])

    @property
    def num_queries(self) -> int:
        return int(self.metadata["num_queries"])

    @property
    def embed_dim(self) -> int:
        return int(self.metadata["embed_dim"])

    @property
    def sources(self) -> list[str] | None:
        """The image paths the index was built from, in index order (`None` for in-memory images)."""
        return self.metadata.get("sources")

    @property
    def has_vision_features(self) -> bool:
        return bool(self.metadata.get("vision_features", False))

    # ----------------------------------------------------------------------------------------------------------------
    # Writing
    # ----------------------------------------------------------------------------------------------------------------

    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        batches,
        shard_size: int = 4096,
        dtype: torch.dtype | None = None,
        sources: Sequence[str] | None = None,
        extra_metadata: dict | None = None,
    ) -> EmbeddingIndex:
        """
        Writes an index from an iterable of embedding batches `(b, Q, E)` (or `(image_feats, vision_feats)` pairs,
        which also stores the vision features), holding at most one shard in memory.

        Args:
            path (`str` or `os.PathLike`): The folder (created; an index already there is overwritten).
            batches (iterable): Batches of image embeddings, in gallery order.
            shard_size (`int`, *optional*, defaults to 4096): Images per shard file (at BLIP-2's 32 x 256, 134 MB
                of float32); a search maps one shard at a time.
            dtype (`torch.dtype`, *optional*): Storage dtype (e.g. `torch.float16` halves the disk and the I/O;
                searches compute in float32). Default: that of the batches.
            sources (`list[str]`, *optional*): The image paths, kept to recompute vision features for re-ranking.
            extra_metadata (`dict`, *optional*): More JSON-able fields for `index.json` (e.g. the model's name).

        Returns:
            [`EmbeddingIndex`]
        """
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}.")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / METADATA_FILE).unlink(missing_ok=True)  # a half-written index must not look complete
        writer = _ShardWriter(folder, shard_size)
        for batch in batches:
            image_feats, vision_feats = batch if isinstance(batch, (tuple, list)) else (batch, None)
            image_feats = image_feats.detach().cpu()
            writer.add(image_feats.to(dtype) if dtype is not None else image_feats, vision_feats)
        writer.flush(final=True)
        if writer.total == 0:
            raise ValueError("No embeddings to index.")
        if sources is not None and len(sources) != writer.total:
            raise ValueError(f"Got {len(sources)} sources for {writer.total} images.")
        metadata = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "num_images": writer.total,
            "num_queries": writer.shape[0],
            "embed_dim": writer.shape[1],
            "dtype": str(writer.dtype),
            "vision_features": writer.with_vision,
            "sources": list(sources) if sources is not None else None,
            "shards": writer.shards,
            **(extra_metadata or {}),
        }
        (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=1), encoding="utf-8")
        return cls(folder)

    @classmethod
    def build(
        cls,
        model,
        images,
        path: str | os.PathLike,
        batch_size: int = 32,
        image_processor=None,
        shard_size: int = 4096,
        dtype: torch.dtype | None = None,
        store_vision_features: bool = False,
        progress: bool = True,
    ) -> EmbeddingIndex:
        """
        Embeds a gallery with a stage-1 model (`get_vision_features`, then `get_image_features`), `batch_size` images
        per forward with a progress bar, and writes the index.

        Args:
            model ([`QFormerForImageTextPretraining`]): The stage-1 model (in eval mode).
            images: `pixel_values (N, C, H, W)`, or a list of images / image paths for the `image_processor`
                (paths are kept in the index to recompute vision features for ITM re-ranking).
            path (`str` or `os.PathLike`): The index folder.
            batch_size (`int`, *optional*, defaults to 32): Images per forward.
            image_processor (`BaseImageProcessor`, *optional*): For images given as a list.
            shard_size, dtype: See [`EmbeddingIndex.write`].
            store_vision_features (`bool`, *optional*, defaults to `False`): Keep the vision features in the shards
                (see the module docstring); otherwise they are recomputed for the re-ranked candidates.
            progress (`bool`, *optional*, defaults to `True`): Show a progress bar.

        Returns:
            [`EmbeddingIndex`]
        """
        sources = [os.fspath(image) for image in images] if _all_paths(images) else None
        batches = iter_vision_features(model, images, batch_size, image_processor, progress, "indexing images")

        @torch.no_grad()
        def embed():
            for vision_feats in batches:  # (b, P, Dv)
                image_feats = model.get_image_features(image_embeds=vision_feats).float().cpu()  # (b, Q, E)
                yield (image_feats, vision_feats.cpu()) if store_vision_features else image_feats

        extra = {"model": model_identity(model)}
        return cls.write(path, embed(), shard_size=shard_size, dtype=dtype, sources=sources, extra_metadata=extra)

    # ----------------------------------------------------------------------------------------------------------------
    # Reading and searching
    # ----------------------------------------------------------------------------------------------------------------

    def iter_chunks(
        self, chunk_size: int | None = None, key: str = "image_feats", progress: bool = False
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """
        Yields `(first image index, rows (c, ...))` over the whole index, `chunk_size` images at a time (default: a
        shard). Each shard is memory-mapped for the time of its chunks and unmapped after: the rows are views into
        the mapping, so a chunk must not be kept past the next one.
        """
        for shard in tqdm(self.shards, desc="searching the index", disable=not progress, leave=False):
            with safe_open(str(self.path / shard["file"]), framework="pt") as handle:
                rows = handle.get_slice(key)
                size = chunk_size or shard["count"]
                for start in range(0, shard["count"], size):
                    yield shard["start"] + start, rows[start : start + size]

    def search(
        self,
        query_features: torch.Tensor,
        k: int,
        chunk_size: int | None = None,
        query_batch_size: int = 256,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The `k` images of best ITC similarity (best-query cosine) for each query, over the whole index.

        Args:
            query_features (`torch.FloatTensor` of shape `(M, E)`): L2-normalised text embeddings.
            k (`int`): Results per query (clipped to the index size).
            chunk_size (`int`, *optional*): Images per matmul (default: a shard). Memory of one step is
                `chunk_size * Q * min(M, query_batch_size)` floats.
            query_batch_size (`int`, *optional*, defaults to 256): Queries per matmul.
            progress (`bool`, *optional*, defaults to `False`): Show a progress bar over the shards.

        Returns:
            `(scores, indices)`: `(M, k)` float and long tensors, best first.
        """
        if query_features.dim() != 2 or query_features.shape[1] != self.embed_dim:
            raise ValueError(f"query_features must be (M, {self.embed_dim}); got {tuple(query_features.shape)}.")
        k = min(k, len(self))
        query_features = query_features.float()
        batches = range(0, len(query_features), query_batch_size)
        running = [_empty_topk(len(query_features[start : start + query_batch_size])) for start in batches]
        # Chunks outside, queries inside: the index is read once whatever the number of queries.
        for offset, image_feats in self.iter_chunks(chunk_size, progress=progress):
            for slot, start in enumerate(batches):
                similarity = chunk_similarity(image_feats, query_features[start : start + query_batch_size])  # (b, c)
                running[slot] = merge_topk(*running[slot], similarity, offset, k)
        if not running:
            return _empty_topk(0)
        return torch.cat([scores for scores, _ in running]), torch.cat([indices for _, indices in running])

    def search_texts(
        self,
        text_features: torch.Tensor,
        k: int,
        chunk_size: int | None = None,
        text_batch_size: int = 1024,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The other direction: each indexed image's `k` best texts of `text_features (M, E)`; scores and indices
        `(N, k)`, best first (the texts are held in memory, the images streamed)."""
        k = min(k, len(text_features))
        scores, indices = [], []
        for _, image_feats in self.iter_chunks(chunk_size, progress=progress):
            chunk_scores, chunk_indices = topk_texts_per_image(image_feats, text_features.float(), k, text_batch_size)
            scores.append(chunk_scores)
            indices.append(chunk_indices)
        return torch.cat(scores), torch.cat(indices)

    def image_features(self, indices: torch.Tensor, key: str = "image_feats") -> torch.Tensor:
        """Rows `indices` of the index (`image_feats (n, Q, E)`, or `vision_feats (n, P, Dv)` when stored), read from
        their shards only."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        starts = torch.tensor([shard["start"] for shard in self.shards])
        shard_of = torch.bucketize(indices, starts, right=True) - 1
        out = None
        for shard_index in shard_of.unique().tolist():
            shard = self.shards[shard_index]
            wanted = (shard_of == shard_index).nonzero().flatten()
            with safe_open(str(self.path / shard["file"]), framework="pt") as handle:
                rows = handle.get_tensor(key)[indices[wanted] - shard["start"]]  # gathers only these rows' pages
            if out is None:
                out = rows.new_empty((len(indices), *rows.shape[1:]))
            out[wanted] = rows
        return out

    def load_all(self) -> torch.Tensor:
        """Every embedding `(N, Q, E)` in memory, float32 (small indexes and the in-memory comparison only)."""
        return torch.cat([chunk.float() for _, chunk in self.iter_chunks()])


class _ShardWriter:
    """Buffers embedding batches and writes a shard file each time `shard_size` images are buffered."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.shards: list[dict] = []
        self.buffer: list[torch.Tensor] = []  # (b, Q, E) each
        self.vision: list[torch.Tensor] = []  # (b, P, Dv) each, when stored
        self.buffered = self.total = 0
        self.shape = self.dtype = self.with_vision = None

    def add(self, image_feats: torch.Tensor, vision_feats: torch.Tensor | None):
        if self.shape is None:
            self.shape, self.dtype = tuple(image_feats.shape[1:]), image_feats.dtype
            self.with_vision = vision_feats is not None
        if tuple(image_feats.shape[1:]) != self.shape or (vision_feats is not None) != self.with_vision:
            raise ValueError(
                f"Every batch must be (b, {self.shape}) with the same fields; got {tuple(image_feats.shape)}."
            )
        self.buffer.append(image_feats)
        if vision_feats is not None:
            self.vision.append(vision_feats.detach().cpu())
        self.buffered += len(image_feats)
        self.total += len(image_feats)
        if self.buffered >= self.shard_size:
            self.flush(final=False)

    def flush(self, final: bool):
        if not self.buffer:
            return
        tensors = {"image_feats": torch.cat(self.buffer)}
        if self.vision:
            tensors["vision_feats"] = torch.cat(self.vision)
        while len(tensors["image_feats"]) >= self.shard_size or (final and len(tensors["image_feats"])):
            rows = min(self.shard_size, len(tensors["image_feats"]))
            name = f"shard-{len(self.shards):05d}.safetensors"
            save_file({key: value[:rows].contiguous() for key, value in tensors.items()}, str(self.folder / name))
            start = self.shards[-1]["start"] + self.shards[-1]["count"] if self.shards else 0
            self.shards.append({"file": name, "start": start, "count": rows})
            tensors = {key: value[rows:] for key, value in tensors.items()}
        # The rest is copied out of the written rows, so that they are freed now rather than with the next shard.
        self.buffer = [tensors["image_feats"].clone()] if len(tensors["image_feats"]) else []
        self.vision = [tensors["vision_feats"].clone()] if self.buffer and "vision_feats" in tensors else []
        self.buffered = sum(len(chunk) for chunk in self.buffer)


def model_identity(model) -> str:
    """What an index records of the model that built it: its folder (absolute) or Hub id, `""` when unknown."""
    name = str(getattr(model, "name_or_path", "") or "")
    return os.path.abspath(name) if name and os.path.isdir(name) else name


def _all_paths(images) -> bool:
    return not torch.is_tensor(images) and len(images) > 0 and all(isinstance(i, (str, os.PathLike)) for i in images)


def iter_vision_features(
    model, images, batch_size: int, image_processor=None, progress: bool = True, desc: str = "images"
) -> Iterator[torch.Tensor]:
    """Yields the vision tower's features `(b, P, Dv)` of `images` (`pixel_values`, images or paths), `batch_size` at
    a time, without gradients."""
    device = getattr(model, "device", torch.device("cpu"))
    bar = tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False)
    for start in bar:
        with torch.no_grad():
            yield model.get_vision_features(
                load_pixel_values(images[start : start + batch_size], image_processor).to(device)
            )


def load_pixel_values(batch, image_processor=None) -> torch.Tensor:
    """`pixel_values (b, C, H, W)` of a batch given as a tensor, or as images / paths for the `image_processor`."""
    if torch.is_tensor(batch):
        return batch
    if image_processor is None:
        raise ValueError("Images given as PIL images / arrays / paths need an image_processor; or pass a tensor.")
    return image_processor(images=[to_rgb_image(image) for image in batch], return_tensors="pt")["pixel_values"]


def vision_feature_source(index: EmbeddingIndex, model, images=None, image_processor=None, batch_size: int = 32):
    """
    A function `indices (n,) -> vision features (n, P, Dv)` for the ITM re-ranking of index candidates: read from the
    index when it stores them, else recomputed by `model` from `images` (default: the paths the index keeps).
    """
    if index.has_vision_features:
        return lambda indices: index.image_features(indices, key="vision_feats")
    images = images if images is not None else index.sources
    if images is None:
        raise ValueError(
            "ITM re-ranking needs the gallery's images: the index keeps no vision features and was built from "
            "in-memory images; pass them again (images=...), or build with store_vision_features=True."
        )
    if len(images) != len(index):
        raise ValueError(f"Got {len(images)} images for an index of {len(index)}.")

    def compute(indices: torch.Tensor) -> torch.Tensor:
        selected = images[indices] if torch.is_tensor(images) else [images[i] for i in indices.tolist()]
        return torch.cat(list(iter_vision_features(model, selected, batch_size, image_processor, progress=False)))

    return compute


def rerank_with_itm(
    itm_scores: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    vision_source: Callable[[torch.Tensor], torch.Tensor],
    top_scores: torch.Tensor,
    top_columns: torch.Tensor,
    rows_are_images: bool,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    ITM re-ranking of each row's candidates (LAVIS' score: ITM match logit + ITC cosine), sorted best first.

    Args:
        itm_scores: `(image positions (p,), text indices (p,), vision features (u, P, Dv)) -> (p,)` match logits,
            where image positions index the vision features.
        vision_source: `image indices (u,) -> (u, P, Dv)` ([`vision_feature_source`]).
        top_scores, top_columns (`torch.Tensor` of shape `(rows, k)`): ITC top-k of each row.
        rows_are_images (`bool`): Rows are images (columns texts), or rows are texts (columns images).

    Returns:
        `(scores, indices)` of shape `(rows, k)`.
    """
    num_rows, k = top_columns.shape
    rows = torch.arange(num_rows).repeat_interleave(k)  # (rows * k,)
    columns = top_columns.flatten()
    images, texts = (rows, columns) if rows_are_images else (columns, rows)
    # Pairs in image order, so that each image's vision features are fetched (or recomputed) once per batch.
    order = torch.argsort(images, stable=True)
    itm = torch.empty(len(order))
    bar = tqdm(range(0, len(order), batch_size), desc="ITM re-ranking", disable=not progress, leave=False)
    for start in bar:
        pairs = order[start : start + batch_size]
        unique_images, positions = images[pairs].unique(return_inverse=True)
        itm[pairs] = itm_scores(positions, texts[pairs], vision_source(unique_images))
    scores = itm.view(num_rows, k) + top_scores
    scores, order = scores.sort(dim=1, descending=True)
    return scores, top_columns.gather(1, order)


__all__ = ["EmbeddingIndex", "chunk_similarity", "merge_topk", "rerank_with_itm", "vision_feature_source"]
