"""
The walk of one training run goes down the layers and never comes back up: `vlbridge stage1` (CLI -> script ->
trainer -> model -> save) is run in-process with a profiler that records, for every call into a vlbridge function,
the layer of the nearest vlbridge frame that led to it. No call may go from a layer to one above it, not even through
transformers (a Trainer callback, a hook): the import test (test_layers.py) checks the imports, this one the calls.
"""

import sys
from pathlib import Path

import pytest
from test_layers import LAYER_OF

from vlbridge.cli import main


PACKAGE = str(Path(__file__).resolve().parents[1] / "vlbridge")


def _part(filename: str) -> str | None:
    """The subpackage (or top-level module) of a file inside vlbridge; None outside it."""
    if not filename.startswith(PACKAGE):
        return None
    rest = filename[len(PACKAGE) + 1 :].split("/")
    return rest[0].removesuffix(".py") if rest else None


def _layer_of_caller(frame) -> str | None:
    caller = frame.f_back
    while caller is not None:
        part = _part(caller.f_code.co_filename)
        if part is not None:
            return part
        caller = caller.f_back
    return None


@pytest.mark.usefixtures("single_thread")
def test_a_stage1_run_only_calls_down_the_layers(tmp_path):
    upward: dict[tuple[str, str], str] = {}
    seen: set[tuple[str, str]] = set()

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = _part(frame.f_code.co_filename)
        if callee is None or callee == "__init__":
            return
        caller = _layer_of_caller(frame)
        if caller is None or caller == "__init__" or caller == callee:
            return
        seen.add((caller, callee))
        if LAYER_OF[callee] > LAYER_OF[caller]:
            upward.setdefault((caller, callee), f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    argv = ["stage1", "--output_dir", str(tmp_path), "--max_steps", "1", "--num_train_images", "8"]
    argv += ["--num_eval_images", "4", "--k_test", "2", "--vision_layers", "1", "--disable_tqdm", "true"]
    sys.setprofile(profile)
    try:
        status = main(argv)
    finally:
        sys.setprofile(None)
    assert status == 0
    # The walk really went through every layer it should: CLI -> script -> trainer -> model, and the save via the hub.
    assert {("cli", "scripts"), ("scripts", "trainers"), ("scripts", "hub"), ("hub", "modeling")} <= seen, seen
    assert any(caller == "trainers" and callee == "modeling" for caller, callee in seen), seen
    assert upward == {}, f"calls that went up the layers (caller layer, callee layer): {upward}"
