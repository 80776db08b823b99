"""Where a batched step's time goes (GPU machine): host scheduling, launching, GPU, sampling.

Usage: python scripts/gpu/step_profile.py dist-gpu/7b-full [--batch 64] [--context 1024]
Random weights made on the device. Prints medians over 16 steady decode steps of: schedule
(host), runner.run (launches returned), the device sync after it (the GPU finishing), and the
sampler (launch + the token read-back), plus nsys-free kernel totals when torch's profiler
sees them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from mistral_compile.runtime.bench import random_params  # noqa: E402
from mistral_compile.runtime.llm import LLM, EngineConfig  # noqa: E402
from mistral_compile.runtime.sampling import SamplingParams  # noqa: E402


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    model = Path(args.model)
    llm = LLM(model, model / "lib.so", "cuda", EngineConfig(max_batch_size=args.batch),
              params=random_params(model / "lib.so", "cuda"))
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=10**6, ignore_eos=True)
    for i in range(args.batch):
        llm.add_request(i, rng.integers(3, 1000, args.context).tolist(), params, text=False)
    while any(not llm.outputs[i].token_ids for i in range(args.batch)):
        llm.step()
    dev = llm.artifact.device
    parts: dict[str, list[float]] = {k: [] for k in ("schedule", "launch", "gpu", "sample",
                                                      "bookkeeping", "total")}
    for _ in range(20):
        dev.sync()
        t0 = time.perf_counter()
        work = llm.scheduler.schedule()
        t1 = time.perf_counter()
        logits = llm.runner.run(work)
        t2 = time.perf_counter()
        dev.sync()
        t3 = time.perf_counter()
        tokens, _ = llm.sampler.sample(logits, [w.seq for w in work])
        t4 = time.perf_counter()
        llm.scheduler.completed(work)
        for i, w in enumerate(work):
            w.seq.tokens.append(int(tokens[i]))
        t5 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0),
                              strict=True):
            parts[key].append(value * 1e3)
    print(f"batch {args.batch} at {args.context}: " + ", ".join(
        f"{k} {statistics.median(v[4:]):.2f} ms" for k, v in parts.items()))
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                work = llm.scheduler.schedule()
                logits = llm.runner.run(work)
                tokens, _ = llm.sampler.sample(logits, [w.seq for w in work])
                llm.scheduler.completed(work)
                for i, w in enumerate(work):
                    w.seq.tokens.append(int(tokens[i]))
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    except Exception as err:  # noqa: BLE001 (a diagnostic: report and go on)
        print(f"no kernel table: {err}")


if __name__ == "__main__":
    main()
