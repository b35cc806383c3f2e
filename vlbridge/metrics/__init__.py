"""Metrics for vision-language models, as pure functions and as local `evaluate` modules (no Hub downloads)."""

from __future__ import annotations

from pathlib import Path

from .caption_metrics import bleu, cider_d, normalize_vqa_answer, tokenize_caption, vqa_accuracy
from .grounding_metrics import box_iou, point_accuracy, rec_accuracy
from .retrieval_recall import best_relevant_rank, image_text_recall, recall_at_k, recall_at_k_from_rankings


_METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """
    The folder of a built-in `evaluate` module, for `evaluate.load(metric_path(name))`.

    Args:
        name (`str`):
            A built-in metric: one of the sub-folders of `vlbridge/metrics` holding `<name>/<name>.py` (`"recall"`,
            `"cider"`, `"bleu4"`, `"vqa_accuracy"`, `"grounding"`).

    Example:

    ```python
    >>> from vlbridge.metrics import metric_path
    >>> metric_path("recall").endswith("recall")
    True
    ```
    """
    available = sorted(p.parent.name for p in _METRICS_DIR.glob("*/*.py") if p.stem == p.parent.name)
    if name not in available:
        raise ValueError(f"Unknown vlbridge metric {name!r}; choose one of {available}.")
    return str(_METRICS_DIR / name)


def load_metric(name: str, config_name: str | None = None, **kwargs):
    """
    Load a built-in metric through `evaluate.load` from its local folder, so it works offline (`HF_HUB_OFFLINE=1`).

    Args:
        name (`str`):
            The metric: `"recall"`, `"cider"`, `"bleu4"`, `"vqa_accuracy"` or `"grounding"`.
        config_name (`str`, *optional*):
            The metric's configuration, e.g. `"scores"` (default) or `"ranking"` for `"recall"`, `"rec"` (default) or
            `"point"` for `"grounding"`.
        kwargs:
            Passed to `evaluate.load` (e.g. `experiment_id`, `num_process`, `process_id` for distributed evaluation).

    Example:

    ```python
    >>> from vlbridge.metrics import load_metric
    >>> recall = load_metric("recall")
    >>> recall.compute(predictions=[[0.9, 0.1], [0.8, 0.2]], references=[[0], [1]], ks=[1, 2])
    {'r1': 0.5, 'r2': 1.0}
    ```
    """
    import evaluate

    return evaluate.load(metric_path(name), config_name, **kwargs)


__all__ = [
    "best_relevant_rank",
    "bleu",
    "box_iou",
    "cider_d",
    "image_text_recall",
    "load_metric",
    "metric_path",
    "normalize_vqa_answer",
    "point_accuracy",
    "rec_accuracy",
    "recall_at_k",
    "recall_at_k_from_rankings",
    "tokenize_caption",
    "vqa_accuracy",
]
