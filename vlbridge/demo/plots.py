"""Loss curves as PNG files, drawn with matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter


# The Trainer's end-of-run summary (`train_loss`, the mean over the run) is one number, not a point of the curve.
_SUMMARY_KEYS = {"train_loss", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def loss_series(history: Sequence[Mapping[str, float] | float]) -> dict[str, tuple[list[float], list[float]]]:
    """
    The loss curves in a Trainer log: every key that is a loss (`loss`, `loss_itc`, `eval_loss`, ...) as
    `(steps, values)`, in the order the keys first appear.

    Args:
        history (`list[dict]` or `list[float]`):
            The Trainer's `state.log_history` (entries without a `step` count from 1), or plain loss values, one per
            logging step.

    Example:

    ```python
    >>> from vlbridge.demo.plots import loss_series
    >>> loss_series([{"loss": 2.0, "step": 10}, {"eval_loss": 1.9, "step": 10}, {"loss": 1.5, "step": 20},
    ...              {"train_loss": 1.7, "step": 20}])
    {'loss': ([10.0, 20.0], [2.0, 1.5]), 'eval_loss': ([10.0], [1.9])}
    >>> loss_series([3.0, 2.5])
    {'loss': ([1.0, 2.0], [3.0, 2.5])}

    ```"""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, entry in enumerate(history, start=1):
        if not isinstance(entry, Mapping):
            entry = {"loss": entry, "step": index}
        step = float(entry.get("step", index))
        for key, value in entry.items():
            is_loss = key.startswith(("loss", "eval_loss")) or key.endswith("_loss")
            if not is_loss or key in _SUMMARY_KEYS or not isinstance(value, (int, float)) or math.isnan(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def plot_loss_curves(history: Sequence[Mapping[str, float] | float], path: str | Path, title: str) -> Path | None:
    """
    Draws the loss curves of one training stage into a PNG; returns its path, or `None` when the log holds no loss.

    The total loss is drawn thick, sub-losses (`loss_itc`, ...) thin, held-out losses (`eval_*`) dashed with markers.

    Args:
        history (`list[dict]` or `list[float]`):
            The stage's `trainer.state.log_history` (or plain loss values).
        path (`str` or `Path`):
            Where the PNG goes.
        title (`str`):
            Title of the plot (e.g. the stage name).

    Example:

    ```python
    >>> import tempfile
    >>> from vlbridge.demo.plots import plot_loss_curves
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     print(plot_loss_curves([{"loss": 2.0, "step": 1}, {"loss": 1.0, "step": 2}], f"{tmp}/a.png", "sft").name)
    ...     print(plot_loss_curves([{"train_runtime": 3.0}], f"{tmp}/b.png", "sft"))
    a.png
    None

    ```"""
    series = loss_series(history)
    if not series:
        return None
    figure = Figure(figsize=(6.0, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, (steps, values) in series.items():
        held_out = key.startswith("eval_")
        axes.plot(
            steps,
            values,
            label=key,
            linewidth=2.2 if key in ("loss", "eval_loss") else 1.2,
            linestyle="--" if held_out else "-",
            marker="o" if held_out or len(steps) == 1 else None,
            markersize=4,
        )
    values = [value for _, stage_values in series.values() for value in stage_values]
    if min(values) > 0 and max(values) / min(values) > 10:
        # Stage-1 sub-losses start near ln(batch) and end orders of magnitude lower: only a log axis shows both.
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    path = Path(path)
    figure.savefig(path, format="png")
    return path
