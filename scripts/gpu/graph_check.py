"""CUDA graphs on or off: same logits, and decode latency of each (7B shape, random fp16 weights).

On the GPU machine after setup (dist-gpu/7b-full/lib-nograph.so and lib.so carried):
  PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu/graph_check.py
"""

import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from mistral_compile.runtime import Engine  # noqa: E402
from mistral_compile.runtime.bench import random_params  # noqa: E402


def main() -> None:
    """Print max |Δlogit| between the two libraries and their decode ms/token."""
    root = REPO / "dist-gpu" / "7b-full"
    params = random_params(root / "lib-nograph.so", "cuda")
    ids = np.random.default_rng(0).integers(3, 32000, 1024).tolist()
    logits, times = {}, {}
    for lib in ("lib-nograph.so", "lib.so"):
        eng = Engine(root, root / lib, device="cuda", params=params)
        out = [eng.prefill(ids)]
        steps = []
        for token in ids[:40]:  # fixed tokens: both libraries see the same sequence
            start = time.perf_counter()
            out.append(eng.decode(token))
            steps.append(time.perf_counter() - start)
        logits[lib], times[lib] = out, statistics.median(steps[5:]) * 1e3
        del eng
    delta = max(float(np.abs(a - b).max()) for a, b in zip(*logits.values(), strict=True))
    print(f"RESULT cuda graph: decode at 1k {times['lib-nograph.so']:.2f} ms/token without, "
          f"{times['lib.so']:.2f} ms/token with; max|dlogit| between them {delta:.2e}")


if __name__ == "__main__":
    main()
