"""Median CUDA-event time of a GPU callable, for the stand-alone kernel checks in scripts/gpu/."""

from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median time of ``fn`` in ms (CUDA events around each call), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
