"""Recall@K for retrieval (pure NumPy functions; the `evaluate` module in `recall/` wraps them)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


# Scores are ranked in blocks of about this many entries, so that COCO-sized matrices (5k images x 25k texts) never
# need full-size temporaries.
_BLOCK_ELEMENTS = 1 << 24


def _as_score_matrix(scores) -> np.ndarray:
    if hasattr(scores, "detach"):  # a torch.Tensor, possibly bf16 / on GPU / requiring grad
        scores = scores.detach().cpu()
        # bf16 / fp16 have no exact NumPy twin; fp32 holds them exactly, fp64 stays fp64.
        scores = (scores.double() if str(scores.dtype) == "torch.float64" else scores.float()).numpy()
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"`scores` must be 2-D (num_queries, num_candidates), got shape {scores.shape}.")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("`scores` contains NaN; rankings with NaN are undefined. Check the model outputs.")
    return scores


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"`ks` must be a non-empty list of positive integers, got {ks}.")
    return ks


def _relevance_mask(relevant: Sequence[Iterable[int]], num_queries: int, num_candidates: int) -> np.ndarray:
    if len(relevant) != num_queries:
        raise ValueError(f"`relevant` has {len(relevant)} entries but `scores` has {num_queries} queries (rows).")
    mask = np.zeros((num_queries, num_candidates), dtype=bool)
    for query, indices in enumerate(relevant):
        indices = [int(i) for i in indices]
        if not indices:
            # Counting such a query as a miss would silently lower recall; it is almost always a data bug.
            raise ValueError(f"Query {query} has no relevant candidate; drop it or fix its ground truth.")
        bad = [i for i in indices if not 0 <= i < num_candidates]
        if bad:
            raise ValueError(f"Query {query} lists relevant candidates {bad} outside [0, {num_candidates}).")
        mask[query, indices] = True
    return mask


def best_relevant_rank(scores, relevant: Sequence[Iterable[int]]) -> np.ndarray:
    """
    The 0-based rank of the best-ranked relevant candidate of every query.

    Candidates are sorted by descending score; equal scores are ordered by ascending candidate index, so the result
    never depends on the sort algorithm.

    Args:
        scores (`np.ndarray` or `torch.Tensor` of shape `(num_queries, num_candidates)`):
            Similarity scores, higher is better.
        relevant (`list[set[int]]` or `list[list[int]]`):
            The ground-truth candidate indices of each query (at least one per query).

    Returns:
        `np.ndarray` of shape `(num_queries,)` (int64): 0 means a relevant candidate is ranked first.

    Example:

    ```python
    >>> import numpy as np
    >>> from vlbridge.metrics.retrieval_recall import best_relevant_rank
    >>> best_relevant_rank(np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3]]), [{2}, {1, 2}]).tolist()
    [1, 1]
    ```
    """
    scores = _as_score_matrix(scores)
    num_queries, num_candidates = scores.shape
    mask = _relevance_mask(relevant, num_queries, num_candidates)
    ranks = np.empty(num_queries, dtype=np.int64)
    candidate = np.arange(num_candidates)
    chunk = max(1, _BLOCK_ELEMENTS // max(1, num_candidates))
    for start in range(0, num_queries, chunk):
        block, block_mask = scores[start : start + chunk], mask[start : start + chunk]
        best_score = np.where(block_mask, block, -np.inf).max(axis=1, keepdims=True)  # (q, 1)
        # The lowest-index relevant candidate holding that score (works even when it is -inf).
        best_index = np.argmax(block_mask & (block == best_score), axis=1)[:, None]  # (q, 1)
        ahead = (block > best_score) | ((block == best_score) & (candidate[None, :] < best_index))
        ranks[start : start + chunk] = ahead.sum(axis=1)
    return ranks


def recall_at_k(scores, relevant: Sequence[Iterable[int]], ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """
    Recall@K: the fraction of queries with at least one relevant candidate among their top K.

    Ties are broken deterministically: among equal scores the lower candidate index ranks first. A `k` larger than
    the number of candidates covers every candidate, so its recall is 1.0.

    Args:
        scores (`np.ndarray` or `torch.Tensor` of shape `(num_queries, num_candidates)`):
            Similarity scores, higher is better (any float dtype or device; NaN raises).
        relevant (`list[set[int]]` or `list[list[int]]`):
            For each query, the indices of its ground-truth candidates (several are allowed, e.g. the five captions
            of a COCO image). A query with none raises a `ValueError` rather than counting as a silent miss.
        ks (`Iterable[int]`, *optional*, defaults to `(1, 5, 10)`):
            The cut-offs to report.

    Returns:
        `dict[str, float]`: `{"r1": ..., "r5": ..., "r10": ...}`, each a fraction in [0, 1].

    Example:

    ```python
    >>> import numpy as np
    >>> from vlbridge.metrics.retrieval_recall import recall_at_k
    >>> scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7], [0.5, 0.4, 0.3]])
    >>> recall_at_k(scores, relevant=[{0}, {1}, {1, 2}], ks=(1, 2))
    {'r1': 0.3333333333333333, 'r2': 0.6666666666666666}
    ```
    """
    ks = _check_ks(ks)
    ranks = best_relevant_rank(scores, relevant)
    return {f"r{k}": float((ranks < k).mean()) for k in ks}


def recall_at_k_from_rankings(
    rankings: Sequence[Sequence[int]], relevant: Sequence[Iterable[int]], ks: Iterable[int] = (1, 5, 10)
) -> dict[str, float]:
    """
    Recall@K from ranked candidate lists (best first), e.g. the top-10 ids returned by a search index.

    Args:
        rankings (`list[list[int]]`):
            For each query, candidate indices ordered best first; a list may be shorter than the largest `k` (only
            the candidates it holds can be hits).
        relevant (`list[set[int]]` or `list[list[int]]`):
            For each query, the indices of its ground-truth candidates (at least one).
        ks (`Iterable[int]`, *optional*, defaults to `(1, 5, 10)`):
            The cut-offs to report.

    Returns:
        `dict[str, float]`: `{"r1": ..., "r5": ..., "r10": ...}`, each a fraction in [0, 1].

    Example:

    ```python
    >>> from vlbridge.metrics.retrieval_recall import recall_at_k_from_rankings
    >>> recall_at_k_from_rankings([[2, 0, 1], [0, 1]], relevant=[[0], [1]], ks=(1, 2))
    {'r1': 0.0, 'r2': 1.0}
    ```
    """
    ks = _check_ks(ks)
    if len(rankings) != len(relevant):
        raise ValueError(f"Got {len(rankings)} rankings but {len(relevant)} lists of relevant candidates.")
    if not rankings:
        raise ValueError("Recall needs at least one query.")
    first_hits = []
    for query, (ranking, truth) in enumerate(zip(rankings, relevant)):
        truth = {int(i) for i in truth}
        if not truth:
            raise ValueError(f"Query {query} has no relevant candidate; drop it or fix its ground truth.")
        ranking = [int(i) for i in ranking]
        # A candidate repeated in a ranking would push later ones down; keep only its first (best) position.
        ranking = list(dict.fromkeys(ranking))
        first_hits.append(next((rank for rank, i in enumerate(ranking) if i in truth), np.iinfo(np.int64).max))
    first_hits = np.asarray(first_hits, dtype=np.int64)
    return {f"r{k}": float((first_hits < k).mean()) for k in ks}


def image_text_recall(
    scores_i2t, text_to_image: Sequence[int], ks: Iterable[int] = (1, 5, 10), scores_t2i=None
) -> dict[str, float]:
    """
    Image-to-text and text-to-image Recall@K from one image-text score matrix, as reported for BLIP-2 / COCO.

    An image retrieves its texts (any of its captions is a hit); a text retrieves its one image.

    Args:
        scores_i2t (`np.ndarray` or `torch.Tensor` of shape `(num_images, num_texts)`):
            Image-text similarity, higher is better; text-to-image retrieval uses its transpose.
        text_to_image (`list[int]`):
            For each text (column), the index of its image (row). Every image needs at least one text.
        ks (`Iterable[int]`, *optional*, defaults to `(1, 5, 10)`):
            The cut-offs to report.
        scores_t2i (`np.ndarray` or `torch.Tensor` of shape `(num_texts, num_images)`, *optional*):
            A separate text-to-image matrix (e.g. re-ranked by ITM on its own); defaults to `scores_i2t`'s transpose.

    Returns:
        `dict[str, float]`: `i2t_r{k}` and `t2i_r{k}` for each `k`, plus `r_mean`, their mean (fractions in [0, 1]).

    Example:

    ```python
    >>> import numpy as np
    >>> from vlbridge.metrics.retrieval_recall import image_text_recall
    >>> scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.7]])  # 2 images, 3 texts
    >>> image_text_recall(scores, text_to_image=[0, 0, 1], ks=(1,))
    {'i2t_r1': 1.0, 't2i_r1': 1.0, 'r_mean': 1.0}
    ```
    """
    scores_i2t = _as_score_matrix(scores_i2t)
    num_images, num_texts = scores_i2t.shape
    text_to_image = [int(i) for i in text_to_image]
    if len(text_to_image) != num_texts:
        raise ValueError(f"`text_to_image` has {len(text_to_image)} entries but `scores_i2t` has {num_texts} texts.")
    image_to_texts: list[list[int]] = [[] for _ in range(num_images)]
    for text, image in enumerate(text_to_image):
        if not 0 <= image < num_images:
            raise ValueError(f"Text {text} points to image {image}, outside [0, {num_images}).")
        image_to_texts[image].append(text)
    orphans = [image for image, texts in enumerate(image_to_texts) if not texts]
    if orphans:
        raise ValueError(
            f"Images {orphans[:5]} have no text in `text_to_image` (no relevant candidate); drop their rows from "
            "`scores_i2t`."
        )
    i2t = recall_at_k(scores_i2t, image_to_texts, ks)
    scores_t2i = scores_i2t.T if scores_t2i is None else _as_score_matrix(scores_t2i)
    t2i = recall_at_k(scores_t2i, [[image] for image in text_to_image], ks)
    result = {f"i2t_{key}": value for key, value in i2t.items()}
    result.update({f"t2i_{key}": value for key, value in t2i.items()})
    result["r_mean"] = float(np.mean(list(result.values())))
    return result


__all__ = ["best_relevant_rank", "image_text_recall", "recall_at_k", "recall_at_k_from_rankings"]
