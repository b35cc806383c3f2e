"""The run report: loss curves, held-out examples and a retrieval example as an HTML page with PNGs beside it,
rendered in headless Chromium (Debian's `chromium` package; skipped without it), and the printed metric table."""

import math
import re
import shutil

import numpy as np
import pytest
from helpers import coloured_share, run_docstring_examples, screenshot
from PIL import Image

from vlbridge.data import make_synthetic_image_text, make_synthetic_vqa
from vlbridge.demo import HeldOutExample, RetrievalExample, loss_series, render_report
from vlbridge.evaluation import format_metric_table


METRICS = {
    "stage1": {"i2t_r1": 0.612345, "itm_accuracy": 0.9, "train_seconds": 71},
    "stage2": {"cider": 0.51, "bleu4": float("nan")},
    "sft": {"vqa_accuracy": 0.7, "notes": None},
}


def fake_log(steps: int, start: float, keys=("loss",), eval_every: int = 0, seed: int = 0) -> list[dict]:
    """A Trainer-like `log_history`: noisy decaying losses every 10 steps, eval losses, the end-of-run summary."""
    rng = np.random.default_rng(seed)
    log = []
    for step in range(10, steps + 1, 10):
        entry = {"step": step, "learning_rate": 1e-4, "grad_norm": 3.0}
        for rank, key in enumerate(keys, start=1):
            entry[key] = float(start * math.exp(-3 * step / steps) * (1 + 0.1 * rng.random()) / rank)
        log.append(entry)
        if eval_every and step % eval_every == 0:
            log.append({"step": step, "eval_loss": entry["loss"] * 1.2})
    return log + [{"step": steps, "train_loss": 1.0, "train_runtime": 9.0}]


def report_inputs() -> dict:
    """Every part of a report, from the built-in synthetic data."""
    captions = make_synthetic_image_text({"test": 6}, image_size=48, seed=0, captions_per_image=1)["test"]
    vqa = make_synthetic_vqa({"test": 6}, image_size=48, seed=0)["test"]
    answers = {}
    for row in vqa:
        answers.setdefault(row["image_id"], []).append((row["question"], row["answer"], row["answer"]))
    examples = [
        HeldOutExample(row["image"], caption=row["caption"], reference=row["caption"], answers=answers[index][:2])
        for index, row in enumerate(captions.select(range(4)))
    ]
    examples[0].answers.append(("what colour is it?", "purple", "red"))  # a wrong answer is marked as such
    examples.append({"image": captions[4]["image"], "caption": "given as a dict"})
    retrieval = RetrievalExample(
        query=captions[5]["caption"],
        images=[captions[index]["image"] for index in (5, 1, 2)],
        scores=[0.9, 0.4, 0.1],
        correct=0,
    )
    losses = {
        "stage1": fake_log(200, 6.0, ("loss", "loss_itc", "loss_itm", "loss_itg"), eval_every=50),
        "stage2": fake_log(100, 4.0, seed=1),
        "sft": fake_log(60, 3.0, eval_every=20, seed=2),
        "dpo": [],  # a stage that ran without logging
    }
    return {"losses": losses, "examples": examples, "retrieval": retrieval, "metrics": METRICS}


def test_metric_table_markdown_and_plain():
    markdown = format_metric_table(METRICS).splitlines()
    assert markdown[:2] == ["| stage | metric | value |", "| --- | --- | --- |"]
    assert "| stage1 | i2t_r1 | 0.6123 |" in markdown and "| stage1 | train_seconds | 71 |" in markdown
    assert "| stage2 | bleu4 | n/a |" in markdown and "| sft | notes | n/a |" in markdown
    assert len(markdown) == 2 + 7
    plain = format_metric_table(METRICS, style="plain").splitlines()
    assert plain[0].split() == ["stage", "metric", "value"] and plain[1].split() == ["stage1", "i2t_r1", "0.6123"]
    assert len({line.index(line.split()[-1]) for line in plain}) == 1  # the value column is aligned
    assert format_metric_table({}) == "(no metrics recorded)"
    with pytest.raises(ValueError, match="markdown"):
        format_metric_table(METRICS, style="latex")


def test_loss_series_keeps_losses_and_drops_the_summary():
    series = loss_series(fake_log(40, 2.0, ("loss", "loss_itc"), eval_every=20))
    assert list(series) == ["loss", "loss_itc", "eval_loss"]
    assert series["loss"][0] == [10.0, 20.0, 30.0, 40.0] and series["eval_loss"][0] == [20.0, 40.0]
    assert loss_series([{"train_loss": 1.0, "train_runtime": 2.0}, {"grad_norm": 1.0}]) == {}


def test_report_files_reference_every_png(tmp_path):
    page = render_report(tmp_path / "report", title="demo <report>", **report_inputs())
    assert page == tmp_path / "report" / "report.html"
    text = page.read_text()
    sources = re.findall(r'<img[^>]*src="([^"]+)"', text)
    written = sorted(path.name for path in page.parent.glob("*.png"))
    # 3 loss plots (dpo logged nothing), 5 held-out images, 3 retrieved images.
    assert written == sorted(sources) and len(written) == 3 + 5 + 3, (written, sources)
    assert {"loss_stage1.png", "loss_stage2.png", "loss_sft.png"} <= set(written)
    for name in written:
        with Image.open(page.parent / name) as image:
            assert image.format == "PNG" and len(image.convert("RGB").getcolors(1 << 20) or []) >= 2, name
    # Self-contained: relative paths only, no script, nothing fetched.
    assert not re.search(r"<script|https?://|src=\"/|@import|url\(", text)
    assert "demo &lt;report&gt;" in text  # text is escaped
    assert "dpo: no loss logged" in text
    assert "0.6123" in text and "vqa_accuracy" in text
    assert text.count('class="right"') == 8 and text.count('class="wrong"') == 1
    assert 'class="correct"' in text and "given as a dict" in text


def test_missing_parts_are_said_not_drawn(tmp_path):
    page = render_report(tmp_path, metrics={"sft": {"vqa_accuracy": 0.5}})
    text = page.read_text()
    assert list(tmp_path.glob("*.png")) == []
    for note in ("No training logs recorded.", "No held-out examples.", "No retrieval example."):
        assert note in text
    retrieval = RetrievalExample("a red circle", [Image.new("RGB", (8, 8))], [0.3], correct=None)
    assert "not in the top k" in render_report(tmp_path, retrieval=retrieval).read_text()
    with pytest.raises(ValueError, match="one score per retrieved image"):
        render_report(tmp_path, retrieval=RetrievalExample("q", [Image.new("RGB", (8, 8))], [0.3, 0.2]))


@pytest.mark.parametrize("name", ["vlbridge.demo.plots", "vlbridge.evaluation.tables", "vlbridge.demo.render"])
def test_docstring_examples(name):
    run_docstring_examples(name)


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="needs Debian's chromium package (`apt-get install chromium`), which .ci/run installs; not installed here",
)
def test_report_renders_in_headless_chromium(tmp_path):
    page = render_report(tmp_path / "report", **report_inputs())
    pixels = screenshot(page, tmp_path / "shot.png", tmp_path / "profile")
    assert pixels.shape == (1600, 1200, 3)
    _, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert counts.max() / counts.sum() < 0.9, "the screenshot is almost all one colour"
    assert len(counts) > 500, f"only {len(counts)} distinct colours"
    shown = coloured_share(pixels)
    # Control: the same page with its PNGs gone (broken image links) keeps only text, marks and borders.
    for png in page.parent.glob("*.png"):
        png.unlink()
    without_images = coloured_share(screenshot(page, tmp_path / "control.png", tmp_path / "profile"))
    assert shown > 0.004 and shown > 3 * without_images, (shown, without_images)
