"""benchmarks/bench_generative.py runs end to end in --quick mode and its parity checks hold (no timing asserted)."""

import math

import pytest
import torch
from helpers import ROOT
from script_loader import load_script, unload_script


BENCHMARK = ROOT / "benchmarks" / "bench_generative.py"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    yield load_script(BENCHMARK, "bench_generative")
    unload_script("bench_generative")


def test_quick_run_matches_transformers(bench, capsys):
    results = bench.main(bench.make_parser().parse_args(["--quick"]))
    assert set(results) == {("generate", "fp32"), ("train", "fp32")}

    generate, train = results["generate", "fp32"], results["train", "fp32"]
    assert generate["identical"]
    sequences = generate["sequences"]
    assert sequences.shape == (bench.QUICK.generate_batch, bench.QUICK.num_queries + 1 + 3 + 5)
    assert len(set(sequences[:, -5:].flatten().tolist())) > 1  # not one repeated token: the check compares something
    assert train["loss_difference"] <= 1e-5 and math.isfinite(train["first_loss"]["vlbridge"])
    for summary in (generate, train):
        ratios = (summary["ratio"], summary["paired_ratio"], summary["cpu_ratio"], *summary["spread"])
        for value in (*ratios, *summary["throughput"].values()):
            assert math.isfinite(value) and value > 0, summary
        # FLOPs are counted for the utilisation table; a training step (forward + backward) costs more than a forward.
        assert summary["flops"]["vlbridge"] > 0 and summary["flops"]["transformers"] > 0
    assert train["flops"]["vlbridge"] > 0.5 * train["flops"]["transformers"]

    table = capsys.readouterr().out
    assert (
        "| stage-2 train step | fp32 | vlbridge |" in table and "| generate 5 tokens | fp32 | transformers |" in table
    )
    assert "| train | fp32 | vlbridge |" in table  # the utilisation table


def test_parity_checks_catch_a_mismatch(bench):
    ours, theirs = bench.build_models(bench.QUICK, dropout=0.0)
    bench.freeze_for_stage2(ours, theirs)
    with torch.no_grad():
        ours.model.language_projection.weight.mul_(-3.0)  # a different model with the same shapes

    with pytest.raises(RuntimeError, match="first-step losses differ"):
        bench.run_train(ours, theirs, bench.QUICK, "fp32", warmup=0, repeats=1)
    bench.set_mode(ours, theirs, training=False)
    with pytest.raises(RuntimeError, match="greedy outputs differ"):
        bench.run_generate(ours, theirs, bench.QUICK, "fp32", warmup=0, repeats=1)
