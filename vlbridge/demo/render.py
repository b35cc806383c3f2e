"""The run report: one self-contained HTML page (inline CSS, no JavaScript, no network) with PNGs beside it."""

from __future__ import annotations

import datetime
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..evaluation.tables import metric_rows
from ..processing.image_utils import to_rgb_image
from .plots import plot_loss_curves


REPORT_FILE = "report.html"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px 32px; color: #1d2330;
       background: #ffffff; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #d8dde6; padding-bottom: 4px; margin-top: 32px; }
.subtitle, .missing { color: #5b6474; } .missing { font-style: italic; }
table.metrics { border-collapse: collapse; } table.metrics th, table.metrics td { border: 1px solid #c9d0dc;
       padding: 4px 12px; text-align: left; } table.metrics th { background: #eef1f6; }
table.metrics td.value { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; } .plots img { width: 520px; border: 1px solid #d8dde6; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 16px; }
figure { margin: 0; } .card { border: 1px solid #d8dde6; border-radius: 6px; padding: 10px; background: #f8f9fb; }
img.thumb { width: 160px; height: auto; display: block; margin: 0 auto 8px auto; border: 1px solid #c9d0dc; }
img.pixelated { image-rendering: pixelated; }
.caption { font-weight: 600; margin: 4px 0; } .reference { color: #5b6474; margin: 2px 0; font-size: 0.9em; }
table.qa { width: 100%; font-size: 0.9em; border-collapse: collapse; margin-top: 6px; }
table.qa td { border-top: 1px solid #e1e5ec; padding: 3px 4px; vertical-align: top; }
.right { color: #1a7f37; } .wrong { color: #c0362c; }
.query { font-size: 1.1em; } .ranking { display: flex; flex-wrap: wrap; gap: 12px; }
.ranking figure { border: 3px solid #d8dde6; border-radius: 6px; padding: 6px; text-align: center; }
.ranking figure.correct { border-color: #1a7f37; background: #eaf6ec; }
"""


@dataclass
class HeldOutExample:
    """
    One held-out image and what the model said about it.

    Args:
        image (`PIL.Image.Image`): The image.
        caption (`str`, *optional*): The generated caption.
        reference (`str`, *optional*): A reference caption, shown under the generated one.
        answers (`list[tuple]`, *optional*): `(question, answer)` or `(question, answer, reference answer)` triples;
            an answer with a reference is marked right or wrong (case- and space-insensitive exact match).
    """

    image: Image.Image
    caption: str | None = None
    reference: str | None = None
    answers: list[tuple] = field(default_factory=list)


@dataclass
class RetrievalExample:
    """
    Text-to-image retrieval for one query: the top-k images, best first, with their scores.

    Args:
        query (`str`): The query caption.
        images (`list[PIL.Image.Image]`): The retrieved images, best first.
        scores (`list[float]`): Their scores (ITC similarity, ITM probability, ...), same order.
        correct (`int`, *optional*): Index in `images` of the image the query describes; `None` when it is not
            among them.
    """

    query: str
    images: list[Image.Image]
    scores: list[float]
    correct: int | None = None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "stage"


def _save_image(image: Image.Image, folder: Path, name: str) -> str:
    to_rgb_image(image).save(folder / name, format="PNG")
    return name


def _img(src: str, image: Image.Image, alt: str) -> str:
    # Built-in images are 32-64 px: drawn larger, they stay sharp instead of blurring.
    pixelated = " pixelated" if max(image.size) < 160 else ""
    return f'<img class="thumb{pixelated}" src="{html.escape(src)}" alt="{html.escape(alt)}">'


def _metrics_section(metrics) -> str:
    rows = metric_rows(metrics)
    if not rows:
        return '<p class="missing">No metrics recorded.</p>'
    body = "".join(
        f'<tr><td>{html.escape(stage)}</td><td>{html.escape(name)}</td><td class="value">{html.escape(value)}</td>'
        "</tr>"
        for stage, name, value in rows
    )
    return f'<table class="metrics"><tr><th>stage</th><th>metric</th><th>value</th></tr>{body}</table>'


def _losses_section(losses, folder: Path) -> str:
    if not losses:
        return '<p class="missing">No training logs recorded.</p>'
    plots, missing = [], []
    for stage, history in losses.items():
        path = plot_loss_curves(history or [], folder / f"loss_{_slug(stage)}.png", title=f"{stage} loss")
        if path is None:
            missing.append(f'<p class="missing">{html.escape(stage)}: no loss logged.</p>')
        else:
            plots.append(f'<figure><img src="{path.name}" alt="{html.escape(stage)} loss curves"></figure>')
    return f'<div class="plots">{"".join(plots)}</div>{"".join(missing)}'


def _answer_row(entry: Sequence) -> str:
    question, answer, reference = (*entry, None)[:3]
    verdict = ""
    if reference is not None:
        right = " ".join(str(answer).lower().split()) == " ".join(str(reference).lower().split())
        mark = "&#10003;" if right else f"&#10007; (reference: {html.escape(str(reference))})"
        verdict = f'<span class="{"right" if right else "wrong"}">{mark}</span>'
    return f"<tr><td>{html.escape(str(question))}</td><td>{html.escape(str(answer))} {verdict}</td></tr>"


def _examples_section(examples, folder: Path) -> str:
    if not examples:
        return '<p class="missing">No held-out examples.</p>'
    cards = []
    for index, example in enumerate(examples):
        if isinstance(example, Mapping):
            example = HeldOutExample(**example)
        src = _save_image(example.image, folder, f"example_{index:02d}.png")
        parts = [_img(src, example.image, f"held-out image {index}")]
        if example.caption is not None:
            parts.append(f'<p class="caption">{html.escape(example.caption)}</p>')
        if example.reference is not None:
            parts.append(f'<p class="reference">reference: {html.escape(example.reference)}</p>')
        if example.answers:
            parts.append(f'<table class="qa">{"".join(_answer_row(entry) for entry in example.answers)}</table>')
        cards.append(f'<figure class="card">{"".join(parts)}</figure>')
    return f'<div class="grid">{"".join(cards)}</div>'


def _retrieval_section(retrieval, folder: Path) -> str:
    if retrieval is None:
        return '<p class="missing">No retrieval example.</p>'
    if isinstance(retrieval, Mapping):
        retrieval = RetrievalExample(**retrieval)
    if len(retrieval.images) != len(retrieval.scores):
        raise ValueError(
            f"RetrievalExample has {len(retrieval.images)} images but {len(retrieval.scores)} scores: pass one score "
            "per retrieved image."
        )
    figures = []
    for rank, (image, score) in enumerate(zip(retrieval.images, retrieval.scores)):
        src = _save_image(image, folder, f"retrieval_{rank:02d}.png")
        correct = rank == retrieval.correct
        label = f"#{rank + 1} &middot; score {score:.3f}" + (" &middot; <b>correct</b>" if correct else "")
        figures.append(
            f'<figure class="{"correct" if correct else ""}">{_img(src, image, f"retrieved image {rank + 1}")}'
            f"<figcaption>{label}</figcaption></figure>"
        )
    note = "" if retrieval.correct is not None else '<p class="missing">The right image is not in the top k.</p>'
    return (
        f'<p class="query">Query: &ldquo;{html.escape(retrieval.query)}&rdquo;</p>'
        f'<div class="ranking">{"".join(figures)}</div>{note}'
    )


def render_report(
    output_dir: str | Path,
    *,
    losses: Mapping[str, Sequence] | None = None,
    examples: Sequence[HeldOutExample | Mapping] | None = None,
    retrieval: RetrievalExample | Mapping | None = None,
    metrics: Mapping[str, Mapping[str, object]] | None = None,
    title: str = "vlbridge run report",
) -> Path:
    """
    Writes a run report into `output_dir`: `report.html` (inline CSS, no JavaScript, nothing fetched) and the PNGs it
    shows beside it (relative paths, so the folder can be zipped or moved). Any part may be missing; the page then
    says so in its place.

    Sections: the metric table, one loss plot per stage, a grid of held-out images with their generated captions and
    answers, and one text-to-image retrieval example.

    Args:
        output_dir (`str` or `Path`):
            The folder (created if needed). Files of an earlier report there are overwritten.
        losses (`dict[str, list]`, *optional*):
            Stage name (`"stage1"`, `"stage2"`, `"sft"`, `"dpo"`, ...) -> that stage's `trainer.state.log_history`
            (or plain loss values). Every loss key is drawn (`loss`, sub-losses such as `loss_itc`, `eval_loss`). A
            stage whose log is empty or holds no loss is listed as such.
        examples (`list[HeldOutExample]` or `list[dict]`, *optional*):
            Held-out images with generated captions and `(question, answer, reference)` triples.
        retrieval ([`RetrievalExample`] or `dict`, *optional*):
            One query caption with its top-k images, their scores and which one is correct.
        metrics (`dict[str, dict[str, float]]`, *optional*):
            Stage name -> metric name -> value; the same table [`format_metric_table`] prints.
        title (`str`, *optional*, defaults to `"vlbridge run report"`):
            Page title.

    Returns:
        `Path`: The path of `report.html`.

    Example:

    ```python
    >>> import tempfile
    >>> from PIL import Image
    >>> from vlbridge.demo import HeldOutExample, render_report
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     example = HeldOutExample(Image.new("RGB", (32, 32), "red"), "a red square", answers=[("colour?", "red")])
    ...     page = render_report(
    ...         tmp,
    ...         losses={"sft": [{"loss": 2.0, "step": 5}, {"loss": 1.2, "step": 10}], "dpo": []},
    ...         examples=[example],
    ...         metrics={"sft": {"vqa_accuracy": 0.5}},
    ...     )
    ...     print(page.name, sorted(path.name for path in page.parent.glob("*.png")))
    report.html ['example_00.png', 'loss_sft.png']

    ```"""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sections = [
        ("metrics", "Metrics", _metrics_section(metrics)),
        ("losses", "Loss curves", _losses_section(losses, folder)),
        ("examples", "Held-out examples", _examples_section(examples, folder)),
        ("retrieval", "Retrieval example", _retrieval_section(retrieval, folder)),
    ]
    body = "".join(f'<section id="{key}"><h2>{heading}</h2>{content}</section>' for key, heading, content in sections)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="subtitle">Written by vlbridge on {stamp}.</p>{body}</body></html>\n'
    )
    path = folder / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path
