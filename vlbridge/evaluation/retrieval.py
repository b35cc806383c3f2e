"""Image-text retrieval with a stage-1 Q-Former, as LAVIS' `compute_sim_matrix` does it for BLIP-2.

1. ITC: every image's query embeddings against every text's `[CLS]` embedding; the score of a pair is the cosine of
   its best query (no temperature).
2. ITM re-ranking: for each image, its `k_test` best texts by ITC are scored again with the ITM head; the score is
   the ITM "match" logit plus the ITC cosine, every other text gets -100. The same for each text against images.
3. Recall@1/5/10 in both directions ([`vlbridge.metrics.retrieval_recall.image_text_recall`]).

Runs in one process (LAVIS splits the rows across ranks); vision features for the re-ranking are kept on the CPU, as
LAVIS does, so only `batch_size` of them sit on the accelerator at a time.

Large galleries: [`ImageTextRetriever.build_index`] writes the image embeddings to an on-disk
[`~vlbridge.evaluation.retrieval_index.EmbeddingIndex`] and [`ImageTextRetriever.retrieve_from_index`] searches it
chunk by chunk, re-ranking only the top `k_test` of each query; it returns the re-ranked top-k lists
([`IndexedRetrievalOutput`]) instead of the dense `(N, M)` matrices, whose re-ranked entries they equal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..metrics.retrieval_recall import image_text_recall, recall_at_k_from_rankings
from ..modeling.stage1_losses import query_text_similarity
from .retrieval_index import EmbeddingIndex, rerank_with_itm, vision_feature_source


logger = logging.get_logger(__name__)

# Score of the pairs the ITM head does not re-rank (LAVIS' fill value).
NOT_RERANKED = -100.0


@dataclass
class RetrievalOutput:
    """
    Result of [`ImageTextRetriever.retrieve`].

    Args:
        scores_i2t (`torch.FloatTensor` of shape `(num_images, num_texts)`):
            Re-ranked image-to-text scores: ITM match logit + ITC cosine on each image's top-k texts, -100 elsewhere.
        scores_t2i (`torch.FloatTensor` of shape `(num_texts, num_images)`):
            The same for each text against the images.
        similarity (`torch.FloatTensor` of shape `(num_images, num_texts)`):
            ITC cosine (best query) of every pair.
        metrics (`dict[str, float]`, *optional*):
            `i2t_r{k}`, `t2i_r{k}` (fractions in [0, 1]) and `r_mean`, when the ground truth was given.
    """

    scores_i2t: torch.Tensor
    scores_t2i: torch.Tensor
    similarity: torch.Tensor
    metrics: dict[str, float] | None = None


@dataclass
class IndexedRetrievalOutput:
    """
    Result of [`ImageTextRetriever.retrieve_from_index`]: the re-ranked top-`k_test` lists, best first.

    Args:
        t2i_scores, t2i_indices (`torch.Tensor` of shape `(num_texts, k)`):
            Each text's re-ranked images (ITM match logit + ITC cosine) and their indices.
        i2t_scores, i2t_indices (`torch.Tensor` of shape `(num_images, k)`, *optional*):
            Each image's re-ranked texts; `None` when only text-to-image retrieval was asked for.
        num_images (`int`, *optional*, defaults to 0):
            The gallery's size.
        metrics (`dict[str, float]`, *optional*):
            `i2t_r{k}`, `t2i_r{k}` and `r_mean`, when the ground truth was given (ranks past `k` count as misses).
    """

    t2i_scores: torch.Tensor
    t2i_indices: torch.Tensor
    i2t_scores: torch.Tensor | None = None
    i2t_indices: torch.Tensor | None = None
    num_images: int = 0
    metrics: dict[str, float] | None = None

    def to_dense(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`scores_i2t (N, M)` (or `None`) and `scores_t2i (M, N)` as [`RetrievalOutput`] has them (-100 off the
        top-k)."""
        num_texts = len(self.t2i_scores)
        scores_t2i = torch.full((num_texts, self.num_images), NOT_RERANKED)
        scores_t2i.scatter_(1, self.t2i_indices, self.t2i_scores)
        if self.i2t_scores is None:
            return None, scores_t2i
        scores_i2t = torch.full((self.num_images, num_texts), NOT_RERANKED)
        return scores_i2t.scatter_(1, self.i2t_indices, self.i2t_scores), scores_t2i


class ImageTextRetriever:
    r"""
    Scores every image against every text with a [`QFormerForImageTextPretraining`] (ITC, then ITM re-ranking of the
    top `k_test` candidates in both directions) and reports Recall@K.

    Args:
        model ([`QFormerForImageTextPretraining`]):
            The stage-1 model (anything with its `get_vision_features`, `get_image_features`, `get_text_features` and
            `compute_itm_logits` methods).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Tokenizes texts given as strings (padded to the longest text, truncated to `max_length`).
        image_processor (`BaseImageProcessor`, *optional*):
            Turns images given as PIL images / arrays into `pixel_values`.
        batch_size (`int`, *optional*, defaults to 32):
            Images, texts or ITM pairs per forward.
        k_test (`int`, *optional*, defaults to 128):
            Candidates re-ranked with ITM per query (LAVIS: 128 for COCO / Flickr), clipped to the number available.
        max_length (`int`, *optional*, defaults to 35):
            Longest tokenized text (LAVIS uses 35 for retrieval).
        ks (`tuple[int, ...]`, *optional*, defaults to `(1, 5, 10)`):
            Recall cut-offs.
        progress (`bool`, *optional*, defaults to `True`):
            Show tqdm progress bars.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge import QFormerForImageTextPretraining, QFormerPretrainingConfig
    >>> from vlbridge.evaluation.retrieval import ImageTextRetriever
    >>> config = QFormerPretrainingConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...                     "intermediate_size": 64, "num_query_tokens": 4, "vocab_size": 100},
    ...     embed_dim=16, decoder_start_token_id=1, eos_token_id=3,
    ... )
    >>> retriever = ImageTextRetriever(QFormerForImageTextPretraining(config), k_test=3, ks=(1, 3), progress=False)
    >>> texts = {"input_ids": torch.randint(5, 100, (6, 5)), "attention_mask": torch.ones(6, 5, dtype=torch.long)}
    >>> out = retriever.retrieve(torch.randn(3, 3, 32, 32), texts, text_to_image=[0, 0, 1, 1, 2, 2])
    >>> out.scores_i2t.shape, out.scores_t2i.shape, sorted(out.metrics)
    (torch.Size([3, 6]), torch.Size([6, 3]), ['i2t_r1', 'i2t_r3', 'r_mean', 't2i_r1', 't2i_r3'])
    ```
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        image_processor=None,
        batch_size: int = 32,
        k_test: int = 128,
        max_length: int = 35,
        ks: tuple[int, ...] = (1, 5, 10),
        progress: bool = True,
    ):
        if batch_size < 1 or k_test < 1:
            raise ValueError(f"batch_size and k_test must be positive, got {batch_size} and {k_test}.")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.k_test = k_test
        self.max_length = max_length
        self.ks = tuple(ks)
        self.progress = progress

    @property
    def device(self) -> torch.device:
        return getattr(self.model, "device", torch.device("cpu"))

    def _bar(self, iterable, desc: str):
        return tqdm(iterable, desc=desc, disable=not self.progress, leave=False)

    @torch.no_grad()
    def encode_images(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `images`: `pixel_values (N, C, H, W)` or a list of images for the image processor. Returns the ITC embeddings
        `(N, Q, E)` and the vision features `(N, P, Dv)` kept for re-ranking, both on the CPU.
        """
        image_feats, vision_feats = [], []
        for start in self._bar(range(0, len(images), self.batch_size), "images"):
            batch = images[start : start + self.batch_size]
            if not torch.is_tensor(batch):
                if self.image_processor is None:
                    raise ValueError("Images given as PIL images / arrays need an image_processor; or pass a tensor.")
                batch = self.image_processor(images=list(batch), return_tensors="pt")["pixel_values"]
            features = self.model.get_vision_features(batch.to(self.device))  # (b, P, Dv)
            image_feats.append(self.model.get_image_features(image_embeds=features).float().cpu())
            vision_feats.append(features.cpu())
        return torch.cat(image_feats), torch.cat(vision_feats)

    def tokenize(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """`texts`: a list of strings (needs the tokenizer) or a mapping with `input_ids` / `attention_mask`."""
        if isinstance(texts, Mapping):
            input_ids = torch.as_tensor(texts["input_ids"])
            attention_mask = texts.get("attention_mask")
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
            return input_ids, attention_mask
        if self.tokenizer is None:
            raise ValueError("Texts given as strings need a tokenizer, or pass a mapping with input_ids.")
        encoded = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return encoded["input_ids"], encoded["attention_mask"]

    @torch.no_grad()
    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITC text embeddings `(M, E)` on the CPU."""
        text_feats = []
        for start in self._bar(range(0, len(input_ids), self.batch_size), "texts"):
            batch = slice(start, start + self.batch_size)
            ids, mask = input_ids[batch].to(self.device), attention_mask[batch].to(self.device)
            text_feats.append(self.model.get_text_features(ids, mask).float().cpu())
        return torch.cat(text_feats)

    @torch.no_grad()
    def itm_scores(
        self,
        image_index: torch.Tensor,
        text_index: torch.Tensor,
        vision_feats: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """ITM "match" logits (LAVIS' `compute_itm`) of the pairs `(image_index[p], text_index[p])`, `(num_pairs,)`."""
        scores = []
        for start in self._bar(range(0, len(image_index), self.batch_size), "ITM re-ranking"):
            images, texts = image_index[start : start + self.batch_size], text_index[start : start + self.batch_size]
            logits = self.model.compute_itm_logits(
                vision_feats[images].to(self.device),
                input_ids[texts].to(self.device),
                attention_mask[texts].to(self.device),
            )  # (b, 2)
            scores.append(logits[:, 1].float().cpu())
        return torch.cat(scores)

    def rerank(
        self,
        similarity: torch.Tensor,
        vision_feats: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Re-ranks each image's top-`k_test` texts and each text's top-`k_test` images with ITM. Returns
        `scores_i2t (N, M)` and `scores_t2i (M, N)`: ITM logit + ITC cosine on the re-ranked pairs, -100 elsewhere.
        """
        scores_i2t = self._rerank_rows(similarity, vision_feats, input_ids, attention_mask, rows_are_images=True)
        scores_t2i = self._rerank_rows(similarity.t(), vision_feats, input_ids, attention_mask, rows_are_images=False)
        return scores_i2t, scores_t2i

    def _rerank_rows(self, similarity, vision_feats, input_ids, attention_mask, rows_are_images: bool):
        num_rows, num_columns = similarity.shape
        k = min(self.k_test, num_columns)
        top_similarity, top_columns = similarity.topk(k, dim=1)  # (rows, k)
        rows = torch.arange(num_rows).repeat_interleave(k)  # (rows * k,)
        columns = top_columns.flatten()
        images, texts = (rows, columns) if rows_are_images else (columns, rows)
        itm = self.itm_scores(images, texts, vision_feats, input_ids, attention_mask).view(num_rows, k)
        scores = torch.full((num_rows, num_columns), NOT_RERANKED)
        return scores.scatter_(1, top_columns, itm + top_similarity)

    def build_index(
        self,
        images,
        path: str | os.PathLike,
        shard_size: int = 4096,
        store_vision_features: bool = False,
        dtype: torch.dtype | None = None,
    ) -> EmbeddingIndex:
        """
        Embeds a gallery in batches of `batch_size` and writes it to an on-disk [`EmbeddingIndex`] at `path`
        ([`EmbeddingIndex.build`]; `images` as for [`retrieve`], or image paths, which the index keeps).
        """
        was_training = getattr(self.model, "training", False)
        if hasattr(self.model, "eval"):
            self.model.eval()
        try:
            return EmbeddingIndex.build(
                self.model,
                images,
                path,
                batch_size=self.batch_size,
                image_processor=self.image_processor,
                shard_size=shard_size,
                dtype=dtype,
                store_vision_features=store_vision_features,
                progress=self.progress,
            )
        finally:
            if was_training:
                self.model.train()

    def retrieve_from_index(
        self,
        index: EmbeddingIndex | str | os.PathLike,
        texts,
        text_to_image: Sequence[int] | None = None,
        images=None,
        chunk_size: int | None = None,
        image_to_text: bool = True,
    ) -> IndexedRetrievalOutput:
        """
        [`retrieve`] over an on-disk gallery: ITC top-`k_test` by chunked search of the index in both directions,
        then ITM re-ranking of those candidates only.

        Args:
            index ([`EmbeddingIndex`] or a path): The gallery ([`build_index`]).
            texts: As for [`retrieve`] (held in memory).
            text_to_image (`list[int]`, *optional*): Each text's image index, for Recall@K.
            images (*optional*): The gallery's images, to recompute the candidates' vision features, when the index
                holds neither them nor image paths.
            chunk_size (`int`, *optional*): Images per search step (default: a shard).
            image_to_text (`bool`, *optional*, defaults to `True`): Also rank the texts of every gallery image; on
                a large gallery this is `N * k_test` ITM passes and the vision features of every image, so searching
                a gallery by text alone may skip it.

        Returns:
            [`IndexedRetrievalOutput`]
        """
        index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex.open(index)
        was_training = getattr(self.model, "training", False)
        if hasattr(self.model, "eval"):
            self.model.eval()
        try:
            input_ids, attention_mask = self.tokenize(texts)
            text_feats = self.encode_texts(input_ids, attention_mask)  # (M, E)
            vision = vision_feature_source(index, self.model, images, self.image_processor, self.batch_size)

            @torch.no_grad()
            def itm(positions, text_index, vision_feats):  # (p,), (p,), (u, P, Dv) -> (p,)
                logits = self.model.compute_itm_logits(
                    vision_feats[positions].to(self.device),
                    input_ids[text_index].to(self.device),
                    attention_mask[text_index].to(self.device),
                )
                return logits[:, 1].float().cpu()

            options = {"batch_size": self.batch_size, "progress": self.progress}
            t2i_top = index.search(
                text_feats, self.k_test, chunk_size=chunk_size, progress=self.progress
            )  # (M, k) each
            t2i = rerank_with_itm(itm, vision, *t2i_top, rows_are_images=False, **options)
            i2t = (None, None)
            if image_to_text:
                i2t_top = index.search_texts(
                    text_feats, self.k_test, chunk_size=chunk_size, progress=self.progress
                )  # (N, k) each
                i2t = rerank_with_itm(itm, vision, *i2t_top, rows_are_images=True, **options)
        finally:
            if was_training:
                self.model.train()
        metrics = None
        if text_to_image is not None:
            if not image_to_text:
                raise ValueError("Recall@K is reported both ways: pass image_to_text=True with text_to_image.")
            metrics = ranked_retrieval_metrics(i2t[1], t2i[1], text_to_image, self.ks)
        return IndexedRetrievalOutput(*t2i, *i2t, num_images=len(index), metrics=metrics)

    def retrieve(self, images, texts, text_to_image: Sequence[int] | None = None) -> RetrievalOutput:
        """
        Scores all images against all texts and, given the ground truth, reports Recall@K.

        Args:
            images (`torch.FloatTensor` of shape `(num_images, C, H, W)` or a list of images):
                The images (a list needs the `image_processor`).
            texts (`list[str]` or a mapping with `input_ids` / `attention_mask`):
                The texts (strings need the `tokenizer`).
            text_to_image (`list[int]`, *optional*):
                For each text, the index of its image; an image may have several texts. Without it no metrics are
                computed. (From image ids: `[image_ids.index(i) for i in text_image_ids]`.)

        Returns:
            [`RetrievalOutput`]
        """
        was_training = getattr(self.model, "training", False)
        if hasattr(self.model, "eval"):
            self.model.eval()
        try:
            image_feats, vision_feats = self.encode_images(images)
            input_ids, attention_mask = self.tokenize(texts)
            text_feats = self.encode_texts(input_ids, attention_mask)
            similarity = query_text_similarity(image_feats, text_feats)  # (N, M) cosine, no temperature
            scores_i2t, scores_t2i = self.rerank(similarity, vision_feats, input_ids, attention_mask)
        finally:
            if was_training:
                self.model.train()
        metrics = None
        if text_to_image is not None:
            metrics = retrieval_metrics(scores_i2t, scores_t2i, text_to_image, self.ks)
            if self.k_test < max(self.ks) and self.k_test < min(scores_i2t.shape):
                logger.warning(f"k_test={self.k_test} < max(ks): ranks beyond k_test are ties at -100.")
        return RetrievalOutput(scores_i2t, scores_t2i, similarity, metrics)


def retrieval_metrics(
    scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, text_to_image: Sequence[int], ks=(1, 5, 10)
) -> dict[str, float]:
    """
    Recall@K in both directions from the two (separately re-ranked) score matrices: an image is a hit when any of its
    texts is in its top K, a text when its image is.

    Returns:
        `dict[str, float]`: `i2t_r{k}`, `t2i_r{k}` and `r_mean` (their mean), fractions in [0, 1].

    Example:

    ```python
    >>> import torch
    >>> from vlbridge.evaluation.retrieval import retrieval_metrics
    >>> scores = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.7, 0.1]])  # 2 images, 3 texts
    >>> retrieval_metrics(scores, scores.t(), text_to_image=[0, 1, 0], ks=(1,))
    {'i2t_r1': 1.0, 't2i_r1': 1.0, 'r_mean': 1.0}
    ```
    """
    return image_text_recall(scores_i2t, text_to_image, ks, scores_t2i=scores_t2i)


def ranked_retrieval_metrics(
    i2t_indices: torch.Tensor, t2i_indices: torch.Tensor, text_to_image: Sequence[int], ks=(1, 5, 10)
) -> dict[str, float]:
    """
    [`retrieval_metrics`] from ranked top-k lists (best first) instead of score matrices: each image's texts
    `(N, k)` and each text's images `(M, k)`; a ground truth past the lists' end is a miss.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge.evaluation.retrieval import ranked_retrieval_metrics
    >>> ranked_retrieval_metrics(torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0], [1]]), [0, 1], ks=(1,))
    {'i2t_r1': 1.0, 't2i_r1': 1.0, 'r_mean': 1.0}
    ```
    """
    texts_of = [[] for _ in range(len(i2t_indices))]
    for text, image in enumerate(text_to_image):
        texts_of[int(image)].append(text)
    i2t = recall_at_k_from_rankings(i2t_indices.tolist(), texts_of, ks)
    t2i = recall_at_k_from_rankings(t2i_indices.tolist(), [[int(image)] for image in text_to_image], ks)
    metrics = {f"i2t_{name}": value for name, value in i2t.items()}
    metrics.update({f"t2i_{name}": value for name, value in t2i.items()})
    metrics["r_mean"] = sum(metrics.values()) / len(metrics)
    return metrics


def retrieve(
    model,
    images,
    texts,
    text_to_image: Sequence[int] | None = None,
    tokenizer=None,
    image_processor=None,
    batch_size: int = 32,
    k_test: int = 128,
    index: EmbeddingIndex | str | os.PathLike | None = None,
    **kwargs,
) -> RetrievalOutput | IndexedRetrievalOutput:
    """Functional form of [`ImageTextRetriever`]: `ImageTextRetriever(model, ...).retrieve(images, texts,
    text_to_image)`. With `index` (an [`EmbeddingIndex`] or a folder, built from `images` when it holds none yet)
    it is `retrieve_from_index` instead, for large galleries, and returns an [`IndexedRetrievalOutput`]."""
    retriever = ImageTextRetriever(
        model, tokenizer=tokenizer, image_processor=image_processor, batch_size=batch_size, k_test=k_test, **kwargs
    )
    if index is None:
        return retriever.retrieve(images, texts, text_to_image)
    if not isinstance(index, EmbeddingIndex) and not EmbeddingIndex.exists(index):
        if images is None:
            raise ValueError(f"{index} holds no index yet: pass the images to build it from.")
        index = retriever.build_index(images, index)
    return retriever.retrieve_from_index(index, texts, text_to_image, images=images)


__all__ = [
    "ImageTextRetriever",
    "IndexedRetrievalOutput",
    "RetrievalOutput",
    "ranked_retrieval_metrics",
    "retrieval_metrics",
    "retrieve",
]
