"""What the text-scoring `evaluate` modules (`cider`, `bleu4`, `vqa_accuracy`) declare about their inputs."""

from __future__ import annotations


def text_with_references_info(description: str, citation: str, inputs_description: str):
    """
    `evaluate.MetricInfo` of a metric scoring one predicted string against a list of reference strings per example.

    Example:

    ```python
    >>> from vlbridge.metrics.metric_info import text_with_references_info
    >>> sorted(text_with_references_info("d", "c", "i").features)
    ['predictions', 'references']
    ```
    """
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features(
            {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
        ),
    )
