"""Median CUDA-event time of a GPU callable, for the stand-alone kernel checks in scripts/gpu/."""

from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 3, batch: int = 1) -> float:
    """Median time of ``fn`` in ms (CUDA events around each call), after ``warmup`` calls.

    ``batch`` > 1 times that many calls between the events, queued behind a sleep kernel so the
    GPU never waits for the host's launches: the figure is the kernels' own time per call
    (for kernels shorter than their launch, which a single call would measure instead).
    """
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        if batch > 1:
            torch.cuda._sleep(20_000_000)  # ~10 ms at 2 GHz: the calls below queue behind it
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / batch)
    return sorted(times)[len(times) // 2]
