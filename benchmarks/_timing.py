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


# Dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s (no sparsity). Model FLOPs utilisation is
# reported against them; `--peak-tflops` overrides for a device not listed. Matched on a substring of the device name.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def device_peak_tflops(device: str, override: float | None = None) -> tuple[float | None, str]:
    """The bf16 peak used for model FLOPs utilisation and the device's name: `override` when given, else the data
    sheet figure matched on the CUDA device name (`None` when unknown or on CPU, where no data sheet applies)."""
    if device != "cuda":
        return override, "cpu"
    import torch

    name = torch.cuda.get_device_name()
    if override is not None:
        return override, name
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak, name
    return None, name


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one call as `torch.utils.flop_counter.FlopCounterMode` counts them (matmuls, convolutions and
    attention; forward and, when the call runs it, backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return counter.get_total_flops()
