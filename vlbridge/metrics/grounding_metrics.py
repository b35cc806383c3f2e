"""
Grounding metrics over generated text (Shikra, ChatSpot): referring expression comprehension (accuracy at IoU >= 0.5
and mean IoU) and pointing (the point inside the target box), with the share of answers that hold no coordinates
counted as misses and reported.

Predictions are read with `vlbridge.processing.parse_coordinates` (tolerant of spacing, tags, missing brackets);
references are target boxes in the same normalised frame as the answers (e.g. `target_box` of
`make_synthetic_grounding`). Region captions are scored with the `cider` metric: predictions are the generated
descriptions, references `[[answer]]` per region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..processing.coordinates import parse_coordinates


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """
    Intersection over union of two `[xmin, ymin, xmax, ymax]` boxes (any one frame); 0 when both are empty.

    Example:

    ```python
    >>> from vlbridge.metrics import box_iou
    >>> box_iou([0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75])  # 1/16 over 7/16
    0.14285714285714285
    ```
    """
    width = min(box_a[2], box_b[2]) - max(box_a[0], box_b[0])
    height = min(box_a[3], box_b[3]) - max(box_a[1], box_b[1])
    intersection = max(width, 0.0) * max(height, 0.0)
    area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
    area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
    union = area_a + area_b - intersection
    return intersection / union if union > 0 else 0.0


def _check(predictions: Sequence[str], references: Sequence[Sequence[float]]) -> list[list[float]]:
    if isinstance(predictions, str) or not all(isinstance(p, str) for p in predictions):
        raise TypeError("predictions must be a list of generated strings, one per example.")
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references: pass one each.")
    if not predictions:
        raise ValueError("Grounding metrics need at least one prediction.")
    boxes = []
    for index, box in enumerate(references):
        box = [float(value) for value in box]
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(
                f"Reference {index} must be a target box [xmin, ymin, xmax, ymax] with xmin <= xmax and ymin <= "
                f"ymax, in the frame of the answers, got {box}."
            )
        boxes.append(box)
    return boxes


def rec_accuracy(
    predictions: Sequence[str], references: Sequence[Sequence[float]], iou_threshold: float = 0.5
) -> dict[str, float]:
    """
    Referring expression comprehension: the first box of each generated answer against the target box.

    Args:
        predictions (`Sequence[str]`):
            Generated answers; the first box written in each is the prediction.
        references (`Sequence[Sequence[float]]`):
            The target box of each, `[xmin, ymin, xmax, ymax]` in the answers' normalised frame.
        iou_threshold (`float`, *optional*, defaults to 0.5):
            IoU at or above which a box is correct (RefCOCO's 0.5).

    Returns:
        `dict[str, float]`: `accuracy` (share with IoU >= `iou_threshold`), `mean_iou`, `invalid_rate` (share with no
        parsable box: they score IoU 0 and count as misses) and `clipped_rate` (share whose coordinates left [0, 1]
        and were clipped).

    Example:

    ```python
    >>> from vlbridge.metrics import rec_accuracy
    >>> predictions = ["[0.1, 0.1, 0.5, 0.5]", "it is at <box>[0.5,0.5,1.0,1.2]</box>", "the left one"]
    >>> references = [[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]
    >>> rec_accuracy(predictions, references)
    {'accuracy': 0.3333333333333333, 'mean_iou': 0.3333333333333333, 'invalid_rate': 0.3333333333333333,
     'clipped_rate': 0.3333333333333333}
    ```
    """
    boxes = _check(predictions, references)
    hits = ious = invalid = clipped = 0.0
    for prediction, target in zip(predictions, boxes):
        parsed = parse_coordinates(prediction)
        clipped += parsed.num_clipped > 0
        if not parsed.boxes:
            invalid += 1
            continue
        iou = box_iou(parsed.boxes[0], target)
        ious += iou
        hits += iou >= iou_threshold
    total = len(boxes)
    return {
        "accuracy": hits / total,
        "mean_iou": ious / total,
        "invalid_rate": invalid / total,
        "clipped_rate": clipped / total,
    }


def point_accuracy(predictions: Sequence[str], references: Sequence[Sequence[float]]) -> dict[str, float]:
    """
    Pointing: the first point `[x, y]` of each generated answer is correct when it lies inside (edges included)
    the target box.

    Args:
        predictions (`Sequence[str]`): Generated answers.
        references (`Sequence[Sequence[float]]`): The target box of each, in the answers' normalised frame.

    Returns:
        `dict[str, float]`: `accuracy`, `invalid_rate` (share with no parsable point, counted as misses) and
        `clipped_rate`.

    Example:

    ```python
    >>> from vlbridge.metrics import point_accuracy
    >>> point_accuracy(["[0.3, 0.3]", "[0.9, 0.1]", "no idea", "[0.5, 0.5]"], [[0.0, 0.0, 0.5, 0.5]] * 4)
    {'accuracy': 0.5, 'invalid_rate': 0.25, 'clipped_rate': 0.0}
    ```
    """
    boxes = _check(predictions, references)
    hits = invalid = clipped = 0.0
    for prediction, box in zip(predictions, boxes):
        parsed = parse_coordinates(prediction)
        clipped += parsed.num_clipped > 0
        if not parsed.points:
            invalid += 1
            continue
        x, y = parsed.points[0]
        hits += box[0] <= x <= box[2] and box[1] <= y <= box[3]
    total = len(boxes)
    return {"accuracy": hits / total, "invalid_rate": invalid / total, "clipped_rate": clipped / total}


__all__ = ["box_iou", "point_accuracy", "rec_accuracy"]
