"""Corpus BLEU-1..4 for captioning as an `evaluate` metric, loaded offline from its folder (`load_metric("bleu4")`)."""

import evaluate

# `evaluate.load` copies this file into its module cache and imports it from there, so the package import is absolute.
from vlbridge.metrics.caption_metrics import bleu
from vlbridge.metrics.metric_info import text_with_references_info


_DESCRIPTION = """
Corpus BLEU-1 to BLEU-4 as computed by the COCO caption evaluation (pycocoevalcap's `Bleu(4)`): clipped n-gram
matches against the references of each image, summed over the corpus, geometric mean of the precisions of orders 1..k,
and a brevity penalty from the reference length closest to each candidate's. Values are fractions in [0, 1]; papers
usually report BLEU-4 times 100.

Captions are lower-cased and PTB-style tokenised with punctuation removed (`vlbridge.metrics.tokenize_caption`) unless
`tokenize=False` is passed for text that is already tokenised. The folder is named `bleu4` so that it cannot be
mistaken for the Hub's sacrebleu-based `bleu` metric, which tokenises and smooths differently.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`):
        One generated caption per image.
    references (`list[list[str]]`):
        The ground-truth captions of each image (at least one each).
    tokenize (`bool`, *optional*, defaults to `True`):
        Tokenise captions with `tokenize_caption` first; with `False` they are only split on whitespace.

Returns:
    `dict[str, float]`: `{"bleu1": ..., "bleu2": ..., "bleu3": ..., "bleu4": ...}`.

Example:

    >>> import evaluate
    >>> bleu4 = evaluate.load("vlbridge/metrics/bleu4")  # doctest: +SKIP
    >>> predictions, references = ["a dog runs on the green grass"], [["a dog runs on the grass"]]
    >>> scores = bleu4.compute(predictions=predictions, references=references)  # doctest: +SKIP
    >>> {key: round(value, 4) for key, value in scores.items()}  # doctest: +SKIP
    {'bleu1': 0.8571, 'bleu2': 0.7559, 'bleu3': 0.6999, 'bleu4': 0.6435}
"""

_CITATION = """
@inproceedings{papineni2002bleu,
  title={{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL},
  year={2002}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu4(evaluate.Metric):
    """Corpus BLEU-1..4 of generated captions against several references per image."""

    def _info(self) -> evaluate.MetricInfo:
        return text_with_references_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, tokenize=True) -> dict[str, float]:
        return bleu(predictions, references, tokenize=tokenize)
