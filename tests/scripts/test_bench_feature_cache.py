"""benchmarks/bench_feature_cache.py runs end to end in --quick mode: the three epochs are timed, the fp32 cache gives
the pixels' loss, and a bf16 cache takes about half the disk of an fp32 one (no timing asserted)."""

import math

import pytest
from helpers import ROOT
from script_loader import load_script, unload_script


BENCHMARK = ROOT / "benchmarks" / "bench_feature_cache.py"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    yield load_script(BENCHMARK, "bench_feature_cache")
    unload_script("bench_feature_cache")


def test_quick_run_times_the_three_epochs_and_measures_the_disk(bench, capsys):
    results = bench.main(bench.make_parser().parse_args(["--quick"]))
    assert set(results["seconds"]) == set(bench.RUNS)
    assert all(math.isfinite(value) and value > 0 for value in results["seconds"].values())
    assert results["fp32_loss_difference"] == 0.0
    disk = results["disk_bytes_per_image"]
    assert 0.4 < disk["bf16"] / disk["fp32"] < 0.6
    assert results["costs"]["tower_params"] > results["costs"]["qformer_params"]
    table = capsys.readouterr().out
    assert "| cache, epoch 2+ |" in table and "| bf16 |" in table


def test_full_sizes_keep_blip2s_tower_to_qformer_ratio(bench):
    from vlbridge.data import build_word_tokenizer, caption_vocabulary

    tokenizer = build_word_tokenizer([*caption_vocabulary(), "[DEC]"])
    costs = bench.cost_ratios(bench.build_model(bench.FULL, tokenizer), bench.FULL)
    assert 8 < costs["param_ratio"] < 12 and 20 < costs["flop_ratio"] < 45
