"""The metric table of a run (stage -> metric -> value) as markdown, aligned plain text, or rows for HTML."""

from __future__ import annotations

from collections.abc import Mapping

from ..modeling.saving import format_value


def metric_rows(metrics: Mapping[str, Mapping[str, object]] | None) -> list[tuple[str, str, str]]:
    """`(stage, metric, formatted value)` for every entry, stages and metrics in the order given."""
    return [
        (str(stage), str(name), format_value(value))
        for stage, values in (metrics or {}).items()
        for name, value in (values or {}).items()
    ]


def format_metric_table(metrics: Mapping[str, Mapping[str, object]] | None, style: str = "markdown") -> str:
    """
    The metric table of a run, one row per (stage, metric), for printing at the end of a run or pasting in a README.

    Args:
        metrics (`dict[str, dict[str, float]]`):
            Stage name -> metric name -> value (e.g. `{"stage1": {"i2t_r1": 0.61}, "sft": {"vqa_accuracy": 0.7}}`).
            Floats print with 4 significant digits; `None` and NaN print as `n/a`.
        style (`str`, *optional*, defaults to `"markdown"`):
            `"markdown"` (a GitHub table) or `"plain"` (columns aligned with spaces).

    Returns:
        `str`: The table, without a trailing newline; a one-line note when there are no metrics.

    Example:

    ```python
    >>> from vlbridge.evaluation import format_metric_table
    >>> print(format_metric_table({"stage1": {"i2t_r1": 0.61234, "itm_accuracy": 0.9}, "sft": {"vqa_accuracy": 0.7}}))
    | stage | metric | value |
    | --- | --- | --- |
    | stage1 | i2t_r1 | 0.6123 |
    | stage1 | itm_accuracy | 0.9 |
    | sft | vqa_accuracy | 0.7 |
    >>> print(format_metric_table({"stage2": {"cider": 0.5}}, style="plain"))
    stage   metric  value
    stage2  cider   0.5

    ```"""
    if style not in ("markdown", "plain"):
        raise ValueError(f"style must be 'markdown' or 'plain', got {style!r}.")
    rows = metric_rows(metrics)
    if not rows:
        return "(no metrics recorded)"
    header = ("stage", "metric", "value")
    if style == "markdown":
        lines = [header, ("---",) * 3, *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max(len(cells[i]) for cells in (header, *rows)) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in (header, *rows)
    )
