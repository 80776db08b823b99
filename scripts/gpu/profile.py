"""Where a step's GPU time goes: the CUDA kernels of one prefill and of decode steps.

torch's profiler (CUPTI) sees the kernels TVM launches too. Run on the GPU machine:

    python3 scripts/gpu/profile.py dist-gpu/7b-full [--lib lib.so] [--prefill 4096] [--steps 16]
        [--kv-cache owned|paged]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mistral_compile.runtime import Engine  # noqa: E402
from mistral_compile.runtime.bench import random_params  # noqa: E402


def table(prof: torch.profiler.profile, label: str, steps: int) -> None:
    """Kernel time per step, heaviest first."""
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events)
    print(f"== {label}: {total / 1e3 / steps:.2f} ms of kernels per step, "
          f"{sum(e.count for e in events) / steps:.0f} launches per step")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:14]:
        print(f"  {e.device_time_total / 1e3 / steps:8.3f} ms  {e.count / steps:6.1f}x  "
              f"{e.key[:90]}")


def gaps(prof: torch.profiler.profile, steps: int) -> None:
    """GPU idle time between consecutive kernels per step, by the pair of kernels around it."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name[:40]) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    idle: dict[tuple[str, str], float] = defaultdict(float)
    for (_, end, before), (start, _, after) in zip(kernels, kernels[1:], strict=False):
        if start > end:
            idle[(before, after)] += start - end
    print(f"  GPU idle between kernels: {sum(idle.values()) / 1e3 / steps:.3f} ms per step")
    for (before, after), us in sorted(idle.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {us / 1e3 / steps:8.3f} ms  after {before} before {after}")


def main() -> None:
    """Profile prefill, then decode, of a random-weight engine."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--lib", default="lib.so")
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--kv-cache", choices=["owned", "paged"], default="owned")
    args = parser.parse_args()
    model = Path(args.model_dir)
    lib = model / args.lib
    eng = Engine(model, lib, device="cuda", params=random_params(lib, "cuda"),
                 attention_sink_size=0, prefill_chunk_size=args.prefill, progress=False,
                 kv_cache=args.kv_cache)
    ids = np.random.default_rng(0).integers(3, 30000, args.prefill).tolist()
    eng.prefill(ids)  # warm-up (and CUDA-graph capture for decode below)
    steps = eng.greedy(5)  # greedy decoding as chat/bench run it (argmax on the device)
    for _ in range(3):
        next(steps)
    eng.reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eng.prefill(ids)
        torch.cuda.synchronize()
    table(prof, f"prefill {args.prefill} tokens", 1)
    gaps(prof, 1)
    steps = eng.greedy(7)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(steps)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            next(steps)
        torch.cuda.synchronize()
    print(f"decode step without the profiler: {wall * 1e3:.2f} ms")
    table(prof, f"decode at {args.prefill}", args.steps)
    gaps(prof, args.steps)
    host_side(eng, args.steps)


def host_side(eng: Engine, steps: int) -> None:
    """Host time of each call of a greedy step, medians.

    begin_forward, the decode VM call (it returns once every kernel of the step is queued),
    end_forward, and the wait for the step's token. The owned cache has no begin/end calls.
    """
    from mistral_compile.runtime.kv_single import _builtin

    paged = eng.kv_cache == "paged"
    kv = eng.kv
    begin, end = _builtin("kv_state_begin_forward"), _builtin("kv_state_end_forward")
    ids = eng._upload([7])
    spans: dict[str, list[float]] = defaultdict(list)
    for _ in range(steps):
        t0 = time.perf_counter()
        if paged:
            begin(kv.cache, kv._seq, kv._one)
        t1 = time.perf_counter()
        args = (ids, kv.cache, eng.params) if paged else (ids, eng.params)
        ids = kv._decode(*args)[1]
        t2 = time.perf_counter()
        if paged:
            end(kv.cache)
        t3 = time.perf_counter()
        ids.numpy()
        t4 = time.perf_counter()
        for name, span in (("begin_forward", t1 - t0), ("decode VM call", t2 - t1),
                           ("end_forward", t3 - t2), ("wait for the token", t4 - t3)):
            spans[name].append(span * 1e6)
    print("  host side of a step (median): " + ", ".join(
        f"{name} {np.median(us):.0f} us" for name, us in spans.items()))


if __name__ == "__main__":
    main()
