"""Image-text retrieval with a stage-1 Q-Former, as LAVIS' `compute_sim_matrix` does it for BLIP-2.

1. ITC: every image's query embeddings against every text's `[CLS]` embedding; the score of a pair is the cosine of
   its best query (no temperature).
2. ITM re-ranking: for each image, its `k_test` best texts by ITC are scored again with the ITM head; the score is
   the ITM "match" logit plus the ITC cosine, every other text gets -100. The same for each text against images.
3. Recall@1/5/10 in both directions ([`vlbridge.metrics.retrieval_recall.image_text_recall`]).

Runs in one process (LAVIS splits the rows across ranks); vision features for the re-ranking are kept on the CPU, as
LAVIS does, so only `batch_size` of them sit on the accelerator at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..metrics.retrieval_recall import image_text_recall
from ..modeling.stage1_losses import query_text_similarity


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


def retrieve(
    model,
    images,
    texts,
    text_to_image: Sequence[int] | None = None,
    tokenizer=None,
    image_processor=None,
    batch_size: int = 32,
    k_test: int = 128,
    **kwargs,
) -> RetrievalOutput:
    """Functional form of [`ImageTextRetriever`]: `ImageTextRetriever(model, ...).retrieve(images, texts,
    text_to_image)`."""
    retriever = ImageTextRetriever(
        model, tokenizer=tokenizer, image_processor=image_processor, batch_size=batch_size, k_test=k_test, **kwargs
    )
    return retriever.retrieve(images, texts, text_to_image)


__all__ = ["ImageTextRetriever", "RetrievalOutput", "retrieval_metrics", "retrieve"]
