"""CIDEr-D for captioning as an `evaluate` metric, loaded offline from its folder (`vlbridge.metrics.load_metric`)."""

import evaluate

# `evaluate.load` copies this file into its module cache and imports it from there, so the package import is absolute.
from vlbridge.metrics.caption_metrics import cider_d
from vlbridge.metrics.metric_info import text_with_references_info


_DESCRIPTION = """
CIDEr-D, the consensus-based captioning metric of the COCO caption evaluation (pycocoevalcap's `Cider()`, which
computes CIDEr-D): tf-idf weighted n-gram (n = 1..4) cosine similarity between a generated caption and each of its
references, with clipping and a Gaussian length penalty (sigma 6), averaged over references, times 10, averaged over
images. The idf comes from the references of the evaluated corpus, so compute it over the whole evaluation set (adding
batches first is fine: the metric scores all of them together). Papers report the value times 100.

Captions are lower-cased and PTB-style tokenised with punctuation removed (`vlbridge.metrics.tokenize_caption`) unless
`tokenize=False` is passed for text that is already tokenised.
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
    `dict[str, float]`: `{"cider": ...}`, between 0 and 10.

Example:

    >>> import evaluate
    >>> cider = evaluate.load("vlbridge/metrics/cider")  # doctest: +SKIP
    >>> references = [["a dog runs on the grass"], ["two cats sleep on a sofa"], ["a red car on a street"]]
    >>> predictions = ["a dog on the grass", "two cats on a sofa", "a red car"]
    >>> cider.compute(predictions=predictions, references=references)  # doctest: +SKIP
    {'cider': 4.416262002822315}
"""

_CITATION = """
@inproceedings{vedantam2015cider,
  title={{CIDEr}: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Cider(evaluate.Metric):
    """Corpus CIDEr-D of generated captions against several references per image."""

    def _info(self) -> evaluate.MetricInfo:
        return text_with_references_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, tokenize=True) -> dict[str, float]:
        return {"cider": cider_d(predictions, references, tokenize=tokenize)}
