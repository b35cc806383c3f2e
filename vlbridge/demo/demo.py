"""
`vlbridge demo`: BLIP-2's whole recipe on the built-in shapes in one process, through the training scripts themselves.

1. **stage 1** ([`~vlbridge.scripts.stage1`]): a small ViT and Q-Former learn ITC + ITM + ITG; held-out R@1.
2. **stage 2** ([`~vlbridge.scripts.stage2`]): the VLM around the stage-1 ViT and Q-Former, its tiny LM warmed up
   on the captions' text, then frozen while the bridge learns to caption; held-out CIDEr.
3. **SFT** ([`~vlbridge.scripts.sft`]): from stage 2, on built-in chats; held-out VQA accuracy.
4. **DPO** ([`~vlbridge.scripts.dpo`]): LoRA from SFT on preference pairs; preference accuracy before and after.

Each stage saves into `<output_dir>/<stage>/` (DPO: `dpo/adapter` and `dpo/merged`) and writes the exact preset it
ran with into `<output_dir>/configs/<stage>.yaml`, which the stage's own command reruns
(`vlbridge stage1 --config outputs/demo/configs/stage1.yaml`). Then `<output_dir>/report/report.html` shows the
loss curves, held-out images with their stage-2 captions and SFT answers, a retrieval example and the metric table,
which is also printed, and `<output_dir>/metrics.json` holds every metric of every stage.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..scripts.utils import ScriptResult, resolve_preset, run_script


STAGES = {
    "stage1": ("stage1", "stage 1: Q-Former pretraining (ITC + ITM + ITG)"),
    "stage2": ("stage2", "stage 2: generative pretraining, frozen LM"),
    "sft": ("sft", "SFT on built-in chats"),
    "dpo": ("dpo", "DPO with LoRA on preference pairs"),
}
REPORT_DEFAULTS = {"num_examples": 8, "questions_per_image": 2, "retrieval_top_k": 4}
SECTIONS = ("shared", *STAGES, "report", "fast")
# The rows of the printed table: stage -> (label, script metric).
TABLE_ROWS = {
    "stage1": [("R@1 image->text", "i2t_r1"), ("R@1 text->image", "t2i_r1"), ("ITM accuracy", "itm_accuracy")],
    "stage2": [("CIDEr", "cider"), ("BLEU-4", "bleu4")],
    "sft": [("VQA accuracy", "vqa_accuracy")],
    "dpo": [
        ("preference accuracy before", "accuracy_before"),
        ("preference accuracy after", "accuracy_after"),
        ("answers = chosen before", "answer_accuracy_before"),
        ("answers = chosen after", "answer_accuracy_after"),
    ],
}


@dataclass
class DemoResult:
    """
    What [`run_demo`] returns.

    Args:
        table (`dict[str, dict[str, float]]`): The printed metric table: stage -> label -> value.
        stages (`dict[str, ScriptResult]`): Each stage's full metrics, checkpoint folder and training log.
        report (`Path`): The report page.
        seconds (`float`): Wall time of the whole run.
    """

    table: dict
    stages: dict[str, ScriptResult] = field(default_factory=dict)
    report: Path | None = None
    seconds: float = 0.0


def parse_overrides(args: list[str]) -> list[tuple[str, str, object]]:
    """
    `--section.key value` (or `--section.key=value`) pairs as `(section, key, value)`, the value read as YAML.

    Example:

    ```python
    >>> from vlbridge.demo.demo import parse_overrides
    >>> parse_overrides(["--stage1.max_steps", "50", "--shared.use_cpu=false", "--sft.learning_rate", "1e-3"])
    [('stage1', 'max_steps', 50), ('shared', 'use_cpu', False), ('sft', 'learning_rate', '1e-3')]
    ```
    """
    overrides, index = [], 0
    while index < len(args):
        flag = args[index]
        name, value = flag.split("=", 1) if "=" in flag else (flag, None)
        section, _, key = name.removeprefix("--").partition(".")
        if not flag.startswith("--") or not key or section not in (*STAGES, "shared", "report"):
            raise ValueError(
                f"Unknown demo argument {flag!r}: overrides are `--<section>.<key> <value>` with a section among "
                f"{['shared', *STAGES, 'report']}, e.g. `--stage1.max_steps 100`."
            )
        if value is None:
            if index + 1 == len(args):
                raise ValueError(f"{flag} needs a value.")
            value, index = args[index + 1], index + 1
        overrides.append((section, key, yaml.safe_load(value)))
        index += 1
    return overrides


def load_demo_config(
    config: str | os.PathLike | None = None, fast: bool = False, overrides: list[tuple[str, str, object]] = ()
) -> tuple[dict[str, dict], dict]:
    """
    The settings of every stage and of the report: each stage's recipe preset, then `shared`, then the stage's own
    section, then (with `fast`) the `fast` section, then `overrides` (from [`parse_overrides`]).

    Args:
        config (`str` or `os.PathLike`, *optional*): The demo preset: a YAML path or a preset name; default `demo`.
        fast (`bool`, *optional*, defaults to `False`): Apply the preset's `fast` section.
        overrides (`list[tuple]`, *optional*): `(section, key, value)`; section `shared` sets every stage.

    Returns:
        `(stages, report)`: stage name -> script preset values, and the report's settings.

    Example:

    ```python
    >>> from vlbridge.demo.demo import load_demo_config
    >>> stages, report = load_demo_config(fast=True, overrides=[("stage1", "max_steps", 2)])
    >>> list(stages), stages["stage1"]["max_steps"], stages["sft"]["image_size"], report["num_examples"]
    (['stage1', 'stage2', 'sft', 'dpo'], 2, 48, 4)
    ```
    """
    raw = yaml.safe_load(resolve_preset(config or "demo").read_text()) or {}
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"Unknown section(s) {unknown} in the demo preset; sections are {list(SECTIONS)}.")
    layers = [raw]
    if fast:
        layers.append({"shared": {}, **(raw.get("fast") or {})})
    stages = {}
    for stage in STAGES:
        section = dict(raw.get(stage) or {})
        preset = section.pop("preset", None)
        settings = dict(yaml.safe_load(resolve_preset(preset).read_text()) or {}) if preset else {}
        for layer in layers:
            settings.update(layer.get("shared") or {})
            settings.update({key: value for key, value in (layer.get(stage) or {}).items() if key != "preset"})
        stages[stage] = settings
    report = {**REPORT_DEFAULTS, **(raw.get("report") or {})}
    if fast:
        report.update((raw.get("fast") or {}).get("report") or {})
    for section, key, value in overrides:
        if section == "report":
            report[key] = value
        for stage in STAGES if section == "shared" else [section] if section in STAGES else []:
            stages[stage][key] = value
    return stages, report


def _wire(stages: dict[str, dict], output_dir: Path) -> None:
    """Each stage's output folder, and where each one starts from (the previous stage's checkpoint)."""
    for stage in STAGES:
        stages[stage]["output_dir"] = str(output_dir / stage)
    stages["stage2"]["from_stage1"] = str(output_dir / "stage1")
    stages["sft"]["model_name_or_path"] = str(output_dir / "stage2")
    stages["dpo"]["model_name_or_path"] = str(output_dir / "sft")
    # DPO keeps the SFT chats' scenes out of its held-out pairs.
    stages["dpo"]["sft_num_train_images"] = stages["sft"].get("num_train_images", 0)


def _header(index: int, stage: str, settings: dict) -> str:
    images = settings.get("num_train_images")
    budget = f"{images:,} training images, " if isinstance(images, int) else ""
    steps = settings.get("max_steps")
    return f"[{index}/{len(STAGES)}] {STAGES[stage][1]}: {budget}{steps} steps -> {settings['output_dir']}"


def run_stages(stages: dict[str, dict], output_dir: Path) -> tuple[dict[str, ScriptResult], dict[str, float]]:
    """Runs the four training scripts in order on their written presets; returns their results and wall times."""
    from transformers import set_seed

    results, seconds = {}, {}
    (output_dir / "configs").mkdir(parents=True, exist_ok=True)
    for index, (stage, settings) in enumerate(stages.items(), start=1):
        path = output_dir / "configs" / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        print(f"\n{_header(index, stage, settings)}", flush=True)
        start = time.perf_counter()
        # The scripts build their models before the Trainer seeds: seed first, so that the demo is reproducible.
        set_seed(settings.get("seed", 42))
        results[stage] = run_script(STAGES[stage][0], ["--config", str(path)])
        seconds[stage] = time.perf_counter() - start
    return results, seconds


def metric_table(results: dict[str, ScriptResult], seconds: dict[str, float]) -> dict[str, dict]:
    """The printed table: the headline metric(s) of each stage, its last logged training loss and its wall time."""
    table = {}
    for stage, result in results.items():
        row = {label: result.metrics.get(key) for label, key in TABLE_ROWS[stage]}
        losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
        row["final training loss"] = losses[-1] if losses else None
        row["seconds"] = round(seconds[stage])
        table[stage] = row
    return table


def run_demo(
    output_dir: str | os.PathLike = "outputs/demo",
    config: str | os.PathLike | None = None,
    fast: bool = False,
    overrides: list[tuple[str, str, object]] = (),
) -> DemoResult:
    """
    Runs the demo: the four stages, then the report; prints a header per stage (and the Trainer's progress bars).

    Args:
        output_dir (`str` or `os.PathLike`, *optional*, defaults to `"outputs/demo"`): Where everything goes.
        config (`str` or `os.PathLike`, *optional*): The demo preset (a path or a preset name); default `demo`.
        fast (`bool`, *optional*, defaults to `False`): Tiny budgets (the preset's `fast` section), under a minute.
        overrides (`list[tuple]`, *optional*): `(section, key, value)` from [`parse_overrides`].

    Returns:
        [`DemoResult`]

    Example:

    ```python
    >>> from vlbridge.demo.demo import run_demo
    >>> result = run_demo("outputs/demo-fast", fast=True)  # doctest: +SKIP
    >>> result.table["sft"]["VQA accuracy"]  # doctest: +SKIP
    0.25
    ```
    """
    from .report import write_report

    start = time.perf_counter()
    output_dir = Path(output_dir)
    stages, report_settings = load_demo_config(config, fast, overrides)
    _wire(stages, output_dir)
    results, seconds = run_stages(stages, output_dir)
    table = metric_table(results, seconds)
    all_metrics = {stage: {**result.metrics, "seconds": seconds[stage]} for stage, result in results.items()}
    (output_dir / "metrics.json").write_text(json.dumps(all_metrics, indent=2, default=str))
    print(f"\n[report] held-out examples and retrieval -> {output_dir / 'report'}", flush=True)
    report = write_report(output_dir, stages, results, table, report_settings, rng=random.Random(0))
    return DemoResult(table, results, report, time.perf_counter() - start)


__all__ = ["DemoResult", "load_demo_config", "parse_overrides", "run_demo"]
