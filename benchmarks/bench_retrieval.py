"""Top-k text -> image search over an on-disk `EmbeddingIndex` against the naive in-memory full similarity matrix:
queries per second and peak memory as the gallery and the number of queries grow.

Galleries of random L2-normalised image embeddings at BLIP-2's ITC size (Q = 32 query embeddings of width E = 256
per image) are written to a safetensors index (`vlbridge.evaluation.retrieval_index`, 4,096 images per shard;
10k images: 0.34 GB on disk in float32, 100k: 3.4 GB, so `--index-dir` should sit on a disk with room for it). For
each gallery and each number of text queries the benchmark times

* **index**: `EmbeddingIndex.search` (shard by shard, a `(chunk * Q, E) @ (E, 256 queries)` matmul, max over Q,
  running top-k merge);
* **naive**: what `ImageTextRetriever.retrieve` does in memory: load every embedding `(N, Q, E)`, the full
  `(N, M)` best-query similarity (`query_text_similarity`, whose `(N, M, Q)` intermediate is the memory hog), then
  `topk`; only where its estimated memory stays under `--naive-max-gb` (the 10k gallery).

Both find the same top-k (checked). Peak memory is the process's resident set (RSS), file pages of the mapped shard
included, above what it held before the call: on Linux the kernel's high-water mark is reset before each call
(`/proc/self/clear_refs`) and read after (`VmHWM`); elsewhere a thread samples the RSS every millisecond. tracemalloc
is no use here: it sees Python's allocator, not torch's tensors. Queries/s are the median of `--repeats` timed
rounds after a warm-up, the two methods alternating (benchmarks/_timing.py); "ratio" is index / naive in the same
process. Run it on an idle machine.

    OMP_NUM_THREADS=8 python benchmarks/bench_retrieval.py                   # 10k and 100k images (minutes)
    python benchmarks/bench_retrieval.py --images 10000 --queries 16,256 --index-dir /data/tmp
    python benchmarks/bench_retrieval.py --quick                             # tiny sizes: a smoke test (tests/)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


# Idle OpenMP threads spin by default, which slows everything down on a shared machine (see bench_stage1.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from vlbridge.evaluation.retrieval_index import EmbeddingIndex  # noqa: E402
from vlbridge.modeling.stage1_losses import query_text_similarity  # noqa: E402


# The timing helpers beside this script, found also when the script is loaded by its path (as the tests do).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import time_rounds  # noqa: E402


@dataclass
class Sizes:
    """Gallery and query sizes of one benchmark configuration."""

    galleries: tuple[int, ...]
    queries: tuple[int, ...]
    num_queries: int  # Q, query embeddings per image
    embed_dim: int  # E
    k: int  # results per text (BLIP-2's k_test for COCO)
    shard_size: int
    query_batch_size: int


FULL = Sizes(
    galleries=(10_000, 100_000),
    queries=(16, 256, 1024),
    num_queries=32,
    embed_dim=256,
    k=128,
    shard_size=4096,
    query_batch_size=256,
)
QUICK = Sizes(
    galleries=(600, 2000), queries=(4, 64), num_queries=4, embed_dim=32, k=10, shard_size=256, query_batch_size=32
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny galleries and 1 round: checks the code path only")
    parser.add_argument("--images", default=None, help="comma-separated gallery sizes (10000,100000)")
    parser.add_argument("--queries", default=None, help="comma-separated numbers of text queries (16,256,1024)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per cell (3; quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per cell")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="index storage dtype")
    parser.add_argument(
        "--naive-max-gb",
        type=float,
        default=2.0,
        help="skip the naive path above this estimate (2 GB: the 10k gallery only)",
    )
    parser.add_argument("--index-dir", default=None, help="where the indexes are written (a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's")
    parser.add_argument("--seed", type=int, default=0)
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Data and the two searches
# ---------------------------------------------------------------------------------------------------------------------


def unit(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


def write_gallery(path: str, num_images: int, sizes: Sizes, dtype: torch.dtype, seed: int) -> EmbeddingIndex:
    """A random gallery written batch by batch, so that it never sits in memory whole either."""
    generator = torch.Generator().manual_seed(seed)
    batch = sizes.shard_size

    def batches():
        for start in tqdm(range(0, num_images, batch), desc=f"writing {num_images:,} images", leave=False):
            yield unit(min(batch, num_images - start), sizes.num_queries, sizes.embed_dim, generator=generator)

    return EmbeddingIndex.write(path, batches(), shard_size=sizes.shard_size, dtype=dtype)


def naive_search(index: EmbeddingIndex, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-memory way: every embedding, the full `(N, M)` similarity, then top-k per text."""
    image_feats = index.load_all()  # (N, Q, E)
    similarity = query_text_similarity(image_feats, queries)  # (N, M), through an (N, M, Q) intermediate
    top = similarity.t().topk(min(k, len(index)), dim=1)
    return top.values, top.indices


def naive_bytes(num_images: int, num_texts: int, sizes: Sizes) -> int:
    """The naive path's main allocations: the embeddings and the `(N, M, Q)` intermediate, float32."""
    return 4 * num_images * sizes.num_queries * (sizes.embed_dim + num_texts)


# ---------------------------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _current_rss() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_above_start(call: Callable[[], object]) -> tuple[object, int]:
    """Runs `call()`; returns its result and the peak RSS during it minus the RSS before it, in bytes."""
    start = _current_rss()
    try:  # Linux >= 4.0: reset the high-water mark to the current RSS
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        result = call()
        return result, _status_kb("VmHWM") * 1024 - start
    except OSError:
        pass
    peak, done = [start], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = call()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], _current_rss()) - start


# ---------------------------------------------------------------------------------------------------------------------
# Runs and table
# ---------------------------------------------------------------------------------------------------------------------


def same_top_k(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """The same `(scores, indices)` top-k, up to the order of near-ties: chunked and whole-matrix products round the
    last bit differently, which may swap two images whose scores differ by less than that."""
    (scores, indices), (other_scores, other_indices) = first, second
    if not torch.allclose(scores, other_scores, rtol=0, atol=1e-5):
        return False
    swapped = indices != other_indices
    return bool(((scores - other_scores).abs()[swapped] <= 1e-5).all())


def run_gallery(index: EmbeddingIndex, sizes: Sizes, args, repeats: int) -> dict[int, dict]:
    """Every number of queries on one gallery: `{num_texts: {"index": ..., "naive": ... or None}}`."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    cells = {}
    for num_texts in sizes.queries:
        queries = unit(num_texts, sizes.embed_dim, generator=generator)
        calls = {"index": lambda _, q=queries: index.search(q, sizes.k, query_batch_size=sizes.query_batch_size)}
        with_naive = naive_bytes(len(index), num_texts, sizes) <= args.naive_max_gb * 2**30
        if with_naive:
            calls["naive"] = lambda _, q=queries: naive_search(index, q, sizes.k)
        wall, _, results = time_rounds(calls, args.warmup, repeats)
        if with_naive and not same_top_k(results["index"][-1], results["naive"][-1]):
            raise AssertionError(f"index and naive top-k differ ({len(index)} images, {num_texts} queries)")
        cell = {}
        for name, call in calls.items():
            _, peak = peak_rss_above_start(lambda call=call: call(0))
            seconds = statistics.median(wall[name])
            cell[name] = {"seconds": seconds, "queries_per_s": num_texts / seconds, "peak_bytes": peak}
        cells[num_texts] = {"index": cell["index"], "naive": cell.get("naive")}
    return cells


def print_table(results: dict[int, dict], sizes: Sizes, disk: dict[int, int]):
    print(
        f"top-{sizes.k} text -> image search, Q = {sizes.num_queries}, E = {sizes.embed_dim}; peak = RSS above the "
        "start of the call; ratio = index / naive\n"
    )
    print(
        "| images | index on disk (MB) | queries | index queries/s | index peak (MB) | naive queries/s | "
        "naive peak (MB) | speed ratio | memory ratio |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for num_images, cells in results.items():
        for num_texts, cell in cells.items():
            index, naive = cell["index"], cell["naive"]
            row = [f"{num_images:,}", f"{disk[num_images] / 2**20:.1f}", f"{num_texts:,}"]
            row += [f"{index['queries_per_s']:,.0f}", f"{index['peak_bytes'] / 2**20:.1f}"]
            if naive is None:
                row += ["(skipped)", "", "", ""]
            else:
                speed = index["queries_per_s"] / naive["queries_per_s"]
                memory = index["peak_bytes"] / max(naive["peak_bytes"], 1)
                row += [f"{naive['queries_per_s']:,.0f}", f"{naive['peak_bytes'] / 2**20:.1f}"]
                row += [f"{speed:.2f}", f"{memory:.3f}"]
            print("| " + " | ".join(row) + " |")


def main(args: argparse.Namespace) -> dict[int, dict[int, dict]]:
    """Runs the benchmark and prints its table; returns `{num_images: {num_texts: cell}}` for the tests."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.images:
        sizes = Sizes(**{**sizes.__dict__, "galleries": tuple(int(n) for n in args.images.split(","))})
    if args.queries:
        sizes = Sizes(**{**sizes.__dict__, "queries": tuple(int(n) for n in args.queries.split(","))})
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    dtype = getattr(torch, args.dtype)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} quick={args.quick} repeats={repeats}")
    print(f"sizes: {sizes}; load average={os.getloadavg()[0]:.2f}\n")
    root = args.index_dir or tempfile.mkdtemp(prefix="bench_retrieval_")
    results, disk = {}, {}
    try:
        for num_images in sizes.galleries:
            folder = os.path.join(root, f"gallery_{num_images}")
            index = write_gallery(folder, num_images, sizes, dtype, args.seed)
            disk[num_images] = sum(os.path.getsize(os.path.join(folder, s["file"])) for s in index.shards)
            results[num_images] = run_gallery(index, sizes, args, repeats)
            shutil.rmtree(folder, ignore_errors=True)  # the next gallery needs the disk more
    finally:
        if args.index_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(results, sizes, disk)
    return results


if __name__ == "__main__":
    main(make_parser().parse_args())
