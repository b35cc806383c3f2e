"""benchmarks/bench_fusion.py runs end to end in --quick mode, and the language model's sequence grows with the images
only under token fusion (no timing asserted)."""

import pytest
from helpers import ROOT
from script_loader import load_script, unload_script


BENCHMARK = ROOT / "benchmarks" / "bench_fusion.py"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    yield load_script(BENCHMARK, "bench_fusion")
    unload_script("bench_fusion")


def test_quick_run_times_every_cell_and_counts_sequence_lengths(bench, capsys):
    results = bench.main(bench.make_parser().parse_args(["--quick"]))
    latents, caption = bench.QUICK.latents, bench.CAPTION_LENGTH
    tasks = {"step (stage2)", "generate"}
    assert set(results) == {(task, fusion, k) for task in tasks for fusion in bench.FUSIONS for k in (1, 3, 5)}
    for (_task, fusion, images), (seconds, length) in results.items():
        assert seconds > 0
        per_image = latents if fusion == "tokens" else 1  # placeholders per image: the latents, or one marker
        assert length == 1 + images * (per_image + caption)
    printed = capsys.readouterr().out
    assert "cross-attn / prefix time" in printed and printed.count("| generate |") == 3
