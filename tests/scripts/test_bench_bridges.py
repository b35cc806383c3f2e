"""benchmarks/bench_bridges.py runs end to end in --quick mode; its token counts are those of each bridge (no timing
asserted)."""

import math

import pytest
from helpers import ROOT
from script_loader import load_script, unload_script


BENCHMARK = ROOT / "benchmarks" / "bench_bridges.py"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    yield load_script(BENCHMARK, "bench_bridges")
    unload_script("bench_bridges")


def test_quick_run_counts_tokens_per_bridge_and_times_every_cell(bench, capsys):
    results = bench.main(bench.make_parser().parse_args(["--quick"]))
    sizes = bench.QUICK
    assert set(results) == {"stage2", "finetune"}
    for stage, cells in results.items():
        assert set(cells) == {(bridge, tiles) for bridge in bench.BRIDGES for tiles in (1, 3, 5)}
        for (bridge, tiles), cell in cells.items():
            # Q-Former queries / Perceiver latents per tile; the MLP passes every patch of every tile (CLS dropped).
            per_tile = sizes.patches if bridge == "mlp" else sizes.num_queries
            assert cell["tokens"] == tiles * per_tile, (stage, bridge, tiles)
            assert cell["sequence"] > cell["tokens"]  # BOS and the caption follow the image tokens
            for value in (cell["median_ms"], cell["min_ms"], cell["ratio"], *cell["losses"]):
                assert math.isfinite(value) and value > 0, (stage, bridge, tiles, cell)
        assert cells["qformer", 1]["ratio"] == 1.0
    # The vision tower never trains; "finetune" adds the language model to what "stage2" trains.
    assert results["finetune"]["mlp", 1]["trainable"] > results["stage2"]["mlp", 1]["trainable"]

    table = capsys.readouterr().out
    assert "| bridge | tiles | tokens / image |" in table
    assert f"| mlp | 5 | {5 * sizes.patches} |" in table and f"| perceiver | 3 | {3 * sizes.num_queries} |" in table


def test_processor_and_model_agree_on_the_tile_counts(bench):
    tokenizer = bench.build_word_tokenizer(bench.WORDS.split())
    model = bench.build_model("perceiver", True, bench.QUICK, tokenizer)
    processor = bench.build_processor(model, tokenizer)
    for tiles in (3, 5):
        batch, tokens = bench.make_batch(processor, model, tiles, bench.QUICK)
        assert tuple(batch["pixel_values"].shape[:2]) == (bench.QUICK.batch_size, tiles)
        assert tokens == tiles * bench.QUICK.num_queries
    with pytest.raises(ValueError, match="Unknown stages / bridges"):
        bench.main(bench.make_parser().parse_args(["--quick", "--bridges", "resampler"]))
