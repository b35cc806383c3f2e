"""benchmarks/bench_stage1.py runs end to end in --quick mode, in both of its modes; its analytic FLOP count is the one
FlopCounterMode counts, with and without the key / value reuse (no timing asserted)."""

import math

import pytest
from helpers import ROOT
from script_loader import load_script, unload_script


BENCHMARK = ROOT / "benchmarks" / "bench_stage1.py"

pytestmark = pytest.mark.usefixtures("single_thread")
# "--malloc default": the tuned malloc settings would stay with the test process after the run.


@pytest.fixture(scope="module")
def bench():
    yield load_script(BENCHMARK, "bench_stage1")
    unload_script("bench_stage1")


def test_quick_reuse_comparison_times_every_pair_and_checks_the_losses(bench, capsys):
    result = bench.main(
        bench.make_parser().parse_args(["--quick", "--compare-reuse", "--device", "cpu", "--malloc", "default"])
    )
    assert set(result["median"]) == {(precision, reuse) for precision in ("fp32", "bf16") for reuse in (True, False)}
    assert all(math.isfinite(value) and value > 0 for value in result["median"].values())
    assert set(result["ratio"]) == {"fp32", "bf16"} and set(result["bf16_speedup"]) == {True, False}
    assert result["loss_gap"] < 1e-5  # both paths compute the same step
    assert all(len(losses) == 1 + 2 for losses in result["losses"].values())  # warm-up + 2 timed rounds
    # The analytic count, reuse or not, is FlopCounterMode's: reuse projects the images once instead of 5 times.
    for reuse in (True, False):
        assert result["flops"][reuse] == pytest.approx(result["counted_flops"][reuse], rel=1e-3)
    assert result["flops"][False] > result["flops"][True]
    assert "| fp32 | reused |" in capsys.readouterr().out


def test_quick_peak_run_keeps_its_table(bench, capsys):
    result = bench.main(
        bench.make_parser().parse_args(["--quick", "--device", "cpu", "--profile", "none", "--malloc", "default"])
    )
    assert set(result["achieved"]) == {"fp32", "bf16"}
    assert all(len(record["step"]) == 2 for record in result["records"].values())
    assert "| precision | median step (s) |" in capsys.readouterr().out
