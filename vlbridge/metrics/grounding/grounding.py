"""Grounding (referring expressions, pointing) as an `evaluate` metric, loaded offline from its folder
(`vlbridge.metrics.load_metric("grounding")`)."""

import datasets
import evaluate

# `evaluate.load` copies this file into its module cache and imports it from there, so the package import is absolute.
from vlbridge.metrics.grounding_metrics import point_accuracy, rec_accuracy


_DESCRIPTION = """
Grounding of generated answers that write coordinates as text (Shikra, ChatSpot: boxes `[xmin, ymin, xmax, ymax]`,
points `[x, y]`, normalised to [0, 1]). Answers are read with `vlbridge.processing.parse_coordinates`, which tolerates
spacing, `<box>` tags and missing brackets, and clips values outside [0, 1] (counted in `clipped_rate`). An answer
with no parsable box (or point) is a miss and counts in `invalid_rate`. References are target boxes in the frame of
the answers (`target_box` of `vlbridge.data.synthetic_grounding.make_synthetic_grounding`).

Two configurations:
- `"rec"` (default): referring expression comprehension. The first box of each answer is correct at IoU >=
  `iou_threshold` (0.5, as RefCOCO); also reports the mean IoU (misses count as 0).
- `"point"`: the first point of each answer is correct when it lies inside the target box (edges included).

Region captions ("what is in the region <box>[...]</box>?") are text, scored with the `cider` metric:
`load_metric("cider").compute(predictions=generated, references=[[answer] for answer in answers])`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`):
        One generated answer per question.
    references (`list[list[float]]`):
        The target box `[xmin, ymin, xmax, ymax]` of each question.
    iou_threshold (`float`, *optional*, defaults to 0.5):
        `"rec"` only: the IoU at or above which a box is correct.

Returns:
    `dict[str, float]`: `"rec"`: `accuracy`, `mean_iou`, `invalid_rate`, `clipped_rate`; `"point"`: `accuracy`,
    `invalid_rate`, `clipped_rate`.

Example:

    >>> import evaluate
    >>> rec = evaluate.load("vlbridge/metrics/grounding", "rec")  # doctest: +SKIP
    >>> targets = [[0.1, 0.1, 0.5, 0.5]] * 2
    >>> rec.compute(predictions=["[0.1, 0.1, 0.5, 0.5]", "no box"], references=targets)  # doctest: +SKIP
    {'accuracy': 0.5, 'mean_iou': 0.5, 'invalid_rate': 0.5, 'clipped_rate': 0.0}
"""

_CITATION = """
@article{chen2023shikra,
  title={Shikra: Unleashing Multimodal {LLM}'s Referential Dialogue Magic},
  author={Chen, Keqin and Zhang, Zhao and Zeng, Weili and Zhang, Richong and Zhu, Feng and Zhao, Rui},
  journal={arXiv preprint arXiv:2306.15195},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Grounding(evaluate.Metric):
    """Referring expression accuracy / mean IoU (`"rec"`) or pointing accuracy (`"point"`) of generated answers."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in ("default", "rec", "point"):
            raise ValueError(f"Unknown grounding configuration {self.config_name!r}; use 'rec' or 'point'.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("float64"))}
            ),
        )

    def _compute(self, predictions, references, iou_threshold=0.5) -> dict[str, float]:
        if self.config_name == "point":
            return point_accuracy(predictions, references)
        return rec_accuracy(predictions, references, iou_threshold=iou_threshold)
