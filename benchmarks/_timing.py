"""Timing shared by the benchmarks: every configuration runs once per round, in an order flipped every other round, so
that none always runs right after the same one (on a warmer cache, or in the same phase of the machine's load)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


def synchronize(device: str) -> None:
    """Waits for the accelerator's queued work, so the wall clock covers it (a no-op on CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_rounds(
    calls: dict[Hashable, Callable[[int], object]],
    warmup: int,
    repeats: int,
    device: str = "cpu",
    after_round: Callable[[int, dict], None] | None = None,
) -> tuple[dict, dict, dict]:
    """
    Runs every call of `calls` (given the round index) once per round, `warmup` untimed rounds then `repeats` timed.

    Returns:
        `(wall, cpu, results)`: per key, the wall-clock and this process's CPU seconds of the timed rounds, and the
        results of every round (warm-up included). `after_round(round_index, {key: result})` runs after each round,
        so that a check stops the run at once.
    """
    wall = {key: [] for key in calls}
    cpu = {key: [] for key in calls}
    results = {key: [] for key in calls}
    keys = list(calls)
    for index in range(warmup + repeats):
        for key in keys if index % 2 == 0 else keys[::-1]:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            result = calls[key](index)
            synchronize(device)
            elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
            results[key].append(result)
            if index >= warmup:
                wall[key].append(elapsed)
                cpu[key].append(cpu_elapsed)
        if after_round is not None:
            after_round(index, {key: values[-1] for key, values in results.items()})
    return wall, cpu, results
