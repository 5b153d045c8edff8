"""Timing for the benchmark scripts: the median of N runs, each timed with CUDA events after warm-up.

(triton's do_bench takes its warm-up and repeat budgets in milliseconds, so a 100 ms call is timed
about once; a fixed number of runs is steadier for long calls.)
"""

from __future__ import annotations

import statistics

import torch


def median_ms(fn, runs: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
