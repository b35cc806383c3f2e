"""benchmarks/bench_retrieval.py runs end to end in --quick mode: every cell is measured, the chunked index and the
naive full matrix agree (checked inside the run), and the table is printed (no timing or memory figure asserted)."""

import math

import pytest
import torch
from helpers import ROOT
from script_loader import load_script, unload_script


BENCHMARK = ROOT / "benchmarks" / "bench_retrieval.py"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    yield load_script(BENCHMARK, "bench_retrieval")
    unload_script("bench_retrieval")


def test_quick_run_measures_every_cell(bench, tmp_path, capsys):
    results = bench.main(bench.make_parser().parse_args(["--quick", "--warmup", "0", "--index-dir", str(tmp_path)]))
    sizes = bench.QUICK
    assert set(results) == set(sizes.galleries)
    for cells in results.values():
        assert set(cells) == set(sizes.queries)
        for cell in cells.values():
            for name in ("index", "naive"):  # the quick galleries are small enough for the naive path
                assert math.isfinite(cell[name]["queries_per_s"]) and cell[name]["queries_per_s"] > 0
                assert cell[name]["peak_bytes"] >= 0
    table = capsys.readouterr().out
    assert "| images | index on disk (MB) | queries | index queries/s |" in table
    assert f"| {sizes.galleries[-1]:,} |" in table
    assert not list(tmp_path.glob("gallery_*"))  # each gallery's index is removed after its cells


def test_naive_is_skipped_above_the_memory_budget_and_searches_agree(bench, tmp_path):
    argv = ["--quick", "--warmup", "0", "--images", "300", "--queries", "3", "--naive-max-gb", "0"]
    results = bench.main(bench.make_parser().parse_args([*argv, "--index-dir", str(tmp_path)]))
    assert results[300][3]["naive"] is None and results[300][3]["index"]["queries_per_s"] > 0

    index = bench.write_gallery(str(tmp_path / "g"), 300, bench.QUICK, torch.float32, seed=0)
    queries = bench.unit(5, bench.QUICK.embed_dim, generator=torch.Generator().manual_seed(1))
    assert torch.equal(index.search(queries, 7)[1], bench.naive_search(index, queries, 7)[1])
    _, peak = bench.peak_rss_above_start(lambda: torch.ones(2**22).sum())  # 16 MB
    assert peak >= 0
