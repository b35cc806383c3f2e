"""Recall@K for retrieval as an `evaluate` metric, loaded offline from its folder (`vlbridge.metrics.load_metric`)."""

import datasets
import evaluate

# `evaluate.load` copies this file into its module cache and imports it from there, so the package import is absolute.
from vlbridge.metrics.retrieval_recall import recall_at_k, recall_at_k_from_rankings


_DESCRIPTION = """
Recall@K: the fraction of queries with at least one relevant candidate among their K best-ranked candidates, as
reported for image-text retrieval (BLIP-2 / COCO / Flickr30k: R@1, R@5, R@10). Each query may have several relevant
candidates (e.g. the five captions of an image). Values are fractions in [0, 1].

Two configurations:
- `"scores"` (default): each prediction is one query's row of similarity scores over all candidates (higher is
  better). Among equal scores the lower candidate index ranks first, so results are deterministic.
- `"ranking"`: each prediction is one query's candidate indices ordered best first (it may be truncated, e.g. a
  top-10 list; only the candidates it holds can be hits).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]` for `"scores"`, `list[list[int]]` for `"ranking"`):
        One row per query: scores over every candidate, or candidate indices best first.
    references (`list[list[int]]`):
        One list per query of the indices of its relevant candidates (at least one each).
    ks (`list[int]`, *optional*, defaults to `[1, 5, 10]`):
        The cut-offs; a `k` above the number of candidates covers them all.

Returns:
    `dict[str, float]`: `{"r1": ..., "r5": ..., "r10": ...}` (one key `r{k}` per cut-off).

Example:

    >>> import evaluate
    >>> recall = evaluate.load("vlbridge/metrics/recall")  # doctest: +SKIP
    >>> recall.compute(predictions=[[0.9, 0.1], [0.8, 0.2]], references=[[0], [1]], ks=[1, 2])  # doctest: +SKIP
    {'r1': 0.5, 'r2': 1.0}
"""

_CITATION = """
@inproceedings{li2023blip2,
  title={{BLIP-2}: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large Language Models},
  author={Li, Junnan and Li, Dongxu and Savarese, Silvio and Hoi, Steven},
  booktitle={ICML},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Recall(evaluate.Metric):
    """Recall@K over per-query score rows (`"scores"`) or ranked candidate lists (`"ranking"`)."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in ("default", "scores", "ranking"):
            raise ValueError(f"Unknown recall configuration {self.config_name!r}; use 'scores' or 'ranking'.")
        prediction = datasets.Value("int64") if self.config_name == "ranking" else datasets.Value("float64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(prediction),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)) -> dict[str, float]:
        if self.config_name == "ranking":
            return recall_at_k_from_rankings(predictions, references, ks)
        lengths = {len(row) for row in predictions}
        if len(lengths) > 1:
            raise ValueError(f"Every score row must cover the same candidates; got row lengths {sorted(lengths)}.")
        return recall_at_k(predictions, references, ks)
