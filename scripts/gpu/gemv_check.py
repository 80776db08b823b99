"""Test and time the decode GEMVs alone (scripts/gpu/gemv_harness.cu), fp16 and q4f16_1.

Usage on the GPU machine: python3 scripts/gpu/gemv_check.py HARNESS.so
For each Mistral-7B decode projection (with its fused mode): max |error| against a float32
reference of the documented math (q4: the weights dequantized by torch from the packed layout
of weights/quantize.py), then the time (L2 flushed before each call) and weight bandwidth for
several grid sizes. Exits non-zero when a case is outside its tolerance.
"""

import ctypes
import sys

import torch
import torch.nn.functional as F

lib = ctypes.CDLL(sys.argv[1])
P = ctypes.c_void_p
EPS = 1e-5
SHIFTS = [4 * (j // 2) + 16 * (j % 2) for j in range(8)]  # element j of a word (quantize.py)


def ptr(t):
    """A tensor's device address for ctypes (None: a null pointer)."""
    return P(t.data_ptr()) if t is not None else P(0)


def dequantize(qw, qs):
    """(q - 7) * scale from uint32 words [n, k/8] (as int32) and float16 scales [n, k/32]."""
    n, words = qw.shape
    q = torch.stack([(qw >> s) & 0xF for s in SHIFTS], dim=-1).reshape(n, words * 8)
    return (q.float() - 7) * qs.float().repeat_interleave(32, dim=1)


def reference(x, aux, w, mode):
    """The float32 result: norm (1), residual (2), norm + silu of [gate; up] (3)."""
    xf = x.float()
    if mode in (1, 3):
        xf = (xf * torch.rsqrt(xf.pow(2).mean() + EPS) * aux.float()).half().float()
    y = w @ xf
    if mode == 2:
        y = y + aux.float()
    if mode == 3:
        g, u = y.chunk(2)
        y = F.silu(g) * u
    return y


FLUSH = torch.ones(64 << 20, dtype=torch.float32, device="cuda")  # 256 MB, > L2 (50 MB)


def cold_ms(fn, reps=30, warmup=3):
    """Median ms of fn() with L2 flushed before each call (weights come from HBM, as in decode)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + reps):
        FLUSH.sum()  # reads: leaves L2 holding clean lines of something else
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run(k, mode, ctas, n, x, aux, w, scales):
    """The harness's result."""
    y = torch.full((n,), float("nan"), dtype=torch.float16, device="cuda")
    rc = lib.launch_gemv(k, mode, ctas, n, ptr(x), ptr(aux), ptr(w), ptr(scales), ptr(y),
                         ctypes.c_float(EPS))
    assert rc == 0, f"launch failed: {rc}"
    return y


torch.manual_seed(0)
bad = 0
shapes = [("qkv", 6144, 4096, 1), ("o", 4096, 4096, 2), ("gate_up", 14336, 4096, 3),
          ("down", 4096, 14336, 2)]
print(f"{'proj':8} {'weights':7} {'ctas':>5} {'max|err|':>9} {'us':>7} {'GB/s':>6}")
for name, n, k, mode in shapes:
    rows = 2 * n if mode == 3 else n
    x = torch.randn(k, device="cuda", dtype=torch.float16)
    aux = (torch.rand(k, device="cuda", dtype=torch.float16) + 0.5 if mode in (1, 3)
           else torch.randn(n, device="cuda", dtype=torch.float16))
    for kind in ("fp16", "q4"):
        if kind == "fp16":
            w = torch.randn(rows, k, device="cuda", dtype=torch.float16) * k ** -0.5
            scales, dense, nbytes = None, w.float(), w.numel() * 2
        else:
            w = torch.randint(-2**31, 2**31 - 1, (rows, k // 8), device="cuda", dtype=torch.int32)
            scales = (torch.rand(rows, k // 32, device="cuda") * 0.01 + 0.001).half()
            dense = dequantize(w, scales)
            nbytes = w.numel() * 4 + scales.numel() * 2
        ref = reference(x, aux, dense, mode)
        tol = 2e-2 * ref.abs().max().item() + 1e-3
        full = -(-n // 8)
        for ctas in sorted({full, min(full, 1024), min(full, 512), min(full, 264),
                            min(full, 132)}, reverse=True):
            y = run(k, mode, ctas, n, x, aux, w, scales)
            err = (y.float() - ref).abs().max().item()
            ok = err <= tol
            bad += not ok
            args = (k, mode, ctas, n, x, aux, w, scales)
            t = cold_ms(lambda args=args: run(*args))
            print(f"{name:8} {kind:7} {ctas:5} {err:9.2e} {t * 1e3:7.1f} "
                  f"{nbytes / t / 1e6:6.0f}" + ("" if ok else "  <-- WRONG"))
sys.exit(1 if bad else 0)
