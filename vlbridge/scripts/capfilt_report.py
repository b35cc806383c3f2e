"""
The `report.html` of a `vlbridge capfilt` run: the summary's counts, then example images, each with its web and
synthetic captions, the filter's ITM score, kept or dropped, and the noise kind where the data knows it. One
self-contained file: images are inline base64 PNGs, every text is escaped (captions are untrusted web text).

Examples are chosen to show every case the run holds (a web caption kept, one dropped, a synthetic caption kept, one
dropped, each kind of known noise), then spread evenly over the remaining images; the shards are read a few columns
at a time, and only the chosen images are decoded.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from ..processing.image_utils import to_rgb_image


REPORT_FILE = "report.html"
# Side of the example images on the page: the built-in images are 32-64 px, shown larger without smoothing.
IMAGE_SIDE = 128
# The cases every report shows when the run holds them, in this order.
CASES = (("web", True), ("web", False), ("synthetic", True), ("synthetic", False))

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
.examples { display: flex; flex-wrap: wrap; gap: 1em; }
.example { border: 1px solid #bbb; border-radius: 6px; padding: 0.6em; width: 32em; }
.example img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; float: left;
  margin-right: 0.8em; border: 1px solid #ccc; }
.example table { clear: both; width: 100%; margin-bottom: 0; }
.kept { background: #e7f6e7; }
.dropped { background: #fbe9e9; }
.score { font-variant-numeric: tabular-nums; }
"""


def _column_reads(shards: list[Path]) -> list[tuple[int, int, int, str, bool, str | None]]:
    """`(shard, row, image_id, source, kept, noise_kind)` of every output row, without reading images."""
    import pyarrow.parquet as pq

    rows = []
    for number, shard in enumerate(shards):
        table = pq.read_table(shard, columns=["image_id", "source", "kept", "noise_kind"])
        columns = [table.column(name).to_pylist() for name in ("image_id", "source", "kept", "noise_kind")]
        rows += [(number, row, *values) for row, values in enumerate(zip(*columns))]
    return rows


def choose_examples(rows: list[tuple], count: int) -> list[tuple[int, int]]:
    """
    `count` images as `(shard, image_id)`, in output order: first one per case present that no chosen image shows
    yet (see `CASES`, then each noise kind), then images spread evenly over the rest.

    Args:
        rows (`list[tuple]`): `(shard, row, image_id, source, kept, noise_kind)` per output row.
        count (`int`): Images wanted.
    """
    cases_of: dict[tuple[int, int], set] = {}
    for shard, _, image_id, source, kept, noise_kind in rows:
        cases = cases_of.setdefault((shard, image_id), set())
        cases.add((source, bool(kept)))
        if noise_kind:
            cases.add(("noise", noise_kind))
    wanted = [case for case in CASES if any(case in cases for cases in cases_of.values())]
    wanted += sorted({case for cases in cases_of.values() for case in cases if case[0] == "noise"})
    chosen: list[tuple[int, int]] = []
    for case in wanted:
        if len(chosen) < count and not any(case in cases_of[image] for image in chosen):
            chosen.append(next(image for image, cases in cases_of.items() if case in cases))
    rest = [image for image in cases_of if image not in chosen]
    spare = min(count - len(chosen), len(rest))
    chosen += [rest[math.floor(at * len(rest) / spare)] for at in range(spare)] if spare > 0 else []
    order = {image: at for at, image in enumerate(cases_of)}
    return sorted(chosen, key=order.__getitem__)


def _image_tag(value: dict) -> str:
    """An `<img>` holding the image as an inline base64 PNG."""
    image = to_rgb_image(value)
    scale = max(1, IMAGE_SIDE // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), resample=0)  # nearest: keep the pixels
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f'<img alt="example image" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _noise_cell(source: str, noisy: bool | None, noise_kind: str | None) -> str:
    if source != "web" or noisy is None:
        return ""  # unknown: a synthetic caption, or web data without the truth
    return html.escape(noise_kind) if noisy else "true caption"


def _examples(shards: list[Path], chosen: list[tuple[int, int]]) -> list[str]:
    """The chosen examples, each shard that holds some read once."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = {}
    for shard in sorted({shard for shard, _ in chosen}):
        table = pq.read_table(shards[shard])
        wanted = [image_id for number, image_id in chosen if number == shard]
        tables[shard] = table.filter(pc.is_in(table.column("image_id"), value_set=_int64_array(wanted))).to_pylist()
    return [_example([row for row in tables[shard] if row["image_id"] == image_id]) for shard, image_id in chosen]


def _int64_array(values: list[int]):
    import pyarrow as pa

    return pa.array(values, type=pa.int64())


def _example(table: list[dict]) -> str:
    """One example: the image and a row per caption (source, text, ITM score, kept / dropped, noise)."""
    image_id = table[0]["image_id"]
    lines = []
    for row in table:
        decision = "kept" if row["kept"] else "dropped"
        lines.append(
            f'<tr class="{decision} {html.escape(row["source"])}-{decision}"><td>{html.escape(row["source"])}</td>'
            f'<td>{html.escape(row["text"])}</td><td class="score">{row["itm_score"]:.3f}</td><td>{decision}</td>'
            f"<td>{_noise_cell(row['source'], row['noisy'], row['noise_kind'])}</td></tr>"
        )
    header = "<tr><th>source</th><th>caption</th><th>ITM</th><th>decision</th><th>noise</th></tr>"
    return (
        f'<div class="example">{_image_tag(table[0]["image"])}<p>image {image_id}</p>'
        f"<table>{header}{''.join(lines)}</table></div>"
    )


def _value(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _summary_tables(summary: dict) -> str:
    """The counts as a table, and the clean fine-tune's held-out metrics before / after when there was one."""
    counts = "".join(
        f"<tr><td>{html.escape(key)}</td><td>{_value(value)}</td></tr>"
        for key, value in summary.items()
        if not isinstance(value, (dict, list))
    )
    parts = [f"<h2>Summary</h2><table>{counts}</table>"]
    for role, record in summary.get("clean_finetune", {}).items():
        metrics = "".join(
            f"<tr><td>{html.escape(key)}</td><td>{_value(value)}</td><td>{_value(record['after'].get(key))}</td></tr>"
            for key, value in record["before"].items()
        )
        parts.append(
            f"<h3>{html.escape(role)}: fine-tuned for {record['steps']} steps on the clean set</h3>"
            f"<table><tr><th>held-out metric</th><th>before</th><th>after</th></tr>{metrics}</table>"
        )
    return "".join(parts)


def write_report(output: Path, shards: list[Path], summary: dict, settings: dict, count: int = 12) -> Path:
    """
    Writes `report.html` into `output`.

    Args:
        output (`Path`): The run's output folder.
        shards (`list[Path]`): Its shards, in order.
        summary (`dict`): What `summary.json` holds.
        settings (`dict`): The run's settings (shown at the top: captioner, filter, data, threshold).
        count (`int`, *optional*, defaults to 12): Example images.

    Returns:
        `Path`: The report.
    """
    chosen = choose_examples(_column_reads(shards), count) if count > 0 else []
    shown = ("captioner", "filter", "dataset", "clean_dataset", "threshold", "num_synthetic", "top_p")
    header = "".join(
        f"<tr><td>{key}</td><td>{_value(settings[key])}</td></tr>" for key in shown if settings.get(key) is not None
    )
    examples = "".join(_examples(shards, chosen))
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>CapFilt report</title>'
        f"<style>{_STYLE}</style></head><body><h1>CapFilt report</h1><table>{header}</table>"
        f"{_summary_tables(summary)}<h2>{len(chosen)} example images</h2>"
        "<p>Every caption of the image with the filter's ITM match probability; green rows are kept.</p>"
        f'<div class="examples">{examples}</div></body></html>\n'
    )
    path = output / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


__all__ = ["REPORT_FILE", "choose_examples", "write_report"]
