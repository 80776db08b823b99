"""Time the q4 decode GEMV (mc::gemv_q4) against its loads-only and compute-only probes.

Usage on the GPU machine: python3 scripts/gpu/q4_probe.py q4_probe.so
(q4_probe.so from scripts/gpu/q4_probe.cu). For each Mistral-7B projection, at the library's
grid (min(rows / 8, 512) CTAs): microseconds per call when calls run back to back over copies
of the weights larger than L2 (as a decode step streams them), and the weight bytes per
second. The library kernel is close to the slower of its probes when one of them limits it.
"""

import ctypes
import sys

import torch

lib = ctypes.CDLL(sys.argv[1])
P = ctypes.c_void_p
PROBES = {"library": 0, "loads": 1, "compute": 2}
SHAPES = [("qkv", 6144, 4096, 1), ("o", 4096, 4096, 2), ("gate_up", 14336, 4096, 3),
          ("down", 4096, 14336, 2)]


def timed_us(go, calls: int) -> float:
    """Median over 5 repetitions of the mean time per call of `calls` back-to-back calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for i in range(calls):
            go(i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[2]


def launcher(which, k, mode, ctas, n, x, aux, ws, ss, y):
    """go(i): one launch of probe `which` on weight copy i % len(ws)."""
    def go(i):
        rc = lib.launch_probe(which, k, mode, ctas, n, P(x.data_ptr()), P(aux.data_ptr()),
                              P(ws[i % len(ws)].data_ptr()), P(ss[i % len(ss)].data_ptr()),
                              P(y.data_ptr()), ctypes.c_float(1e-5))
        assert rc == 0, f"launch failed: {rc}"
    return go


torch.manual_seed(0)
print(f"{'proj':8} {'probe':8} {'ctas':>5} {'us':>7} {'GB/s':>6}")
for name, n, k, mode in SHAPES:
    rows = 2 * n if mode == 3 else n
    nbytes = rows * k // 2 + rows * k // 32 * 2
    copies = max(2, -(-400_000_000 // nbytes))
    ws = [torch.randint(-2**31, 2**31 - 1, (rows, k // 8), device="cuda", dtype=torch.int32)
          for _ in range(copies)]
    ss = [(torch.rand(rows, k // 32, device="cuda") * 0.01 + 0.001).half()
          for _ in range(copies)]
    x = torch.randn(k, device="cuda", dtype=torch.float16)
    aux = (torch.rand(k, device="cuda", dtype=torch.float16) + 0.5 if mode in (1, 3)
           else torch.randn(n, device="cuda", dtype=torch.float16))
    y = torch.zeros(n, device="cuda", dtype=torch.float16)
    ctas = min(-(-n // 8), 512)
    for probe, which in PROBES.items():
        go = launcher(which, k, mode, ctas, n, x, aux, ws, ss, y)
        for i in range(copies * 2):
            go(i)
        t = timed_us(go, copies * 6)
        print(f"{name:8} {probe:8} {ctas:5} {t:7.1f} {nbytes / t / 1e3:6.0f}", flush=True)
