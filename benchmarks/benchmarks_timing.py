"""Timing for the benchmark scripts: the median of N runs, each timed with CUDA events after warm-up.

(triton's do_bench takes its warm-up and repeat budgets in milliseconds, so a 100 ms call is timed
about once; a fixed number of runs is steadier for long calls.)
"""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, runs: int = 10, warmup: int = 2) -> float:
    """On a CUDA host, CUDA events; elsewhere the wall clock (a benchmark's CPU check, not a GPU figure)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, runs: int = 50) -> float:
    """Median of `runs` replays of fn captured in a CUDA graph (sea_convert.captured.capture: after a warm-up on
    a side stream, which also compiles what torch.compile will compile)."""
    from sea_convert.captured import capture

    graph, _ = capture(fn)
    return median_ms(graph.replay, runs=runs, warmup=5)
