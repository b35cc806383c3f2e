"""VQAv2 accuracy as an `evaluate` metric, loaded offline from its folder (`vlbridge.metrics.load_metric`)."""

import evaluate

# `evaluate.load` copies this file into its module cache and imports it from there, so the package import is absolute.
from vlbridge.metrics.caption_metrics import vqa_accuracy
from vlbridge.metrics.metric_info import text_with_references_info


_DESCRIPTION = """
VQA accuracy as computed by the official VQAv2 evaluation: answers are normalised (punctuation, number words to
digits, articles dropped, contractions; `vlbridge.metrics.normalize_vqa_answer`), and with 10 human answers a
prediction scores min(1, #matching annotators / 3) averaged over the 10 leave-one-annotator-out subsets (1, 2, 3, 4+
agreeing annotators give 0.3, 0.6, 0.9, 1.0). With fewer than 3 reference answers per question, an answer matching any
of them scores 1.0. Scores are averaged over questions (fractions in [0, 1]; papers report times 100).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`):
        One predicted answer per question.
    references (`list[list[str]]`):
        The human answers of each question (at least one each; VQAv2 has 10).

Returns:
    `dict[str, float]`: `{"vqa_accuracy": ...}`.

Example:

    >>> import evaluate
    >>> vqa = evaluate.load("vlbridge/metrics/vqa_accuracy")  # doctest: +SKIP
    >>> vqa.compute(predictions=["Two", "a cat"], references=[["2"], ["dog"]])  # doctest: +SKIP
    {'vqa_accuracy': 0.5}
"""

_CITATION = """
@inproceedings{goyal2017vqav2,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    """VQAv2 accuracy of predicted answers against the human answers of each question."""

    def _info(self) -> evaluate.MetricInfo:
        return text_with_references_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references) -> dict[str, float]:
        return {"vqa_accuracy": vqa_accuracy(predictions, references)}
