"""Test and time the prefill GEMM mc::gemm_wgmma alone (scripts/gpu/gemm_harness.cu).

Usage on the GPU machine: python3 scripts/gpu/gemm_check.py HARNESS.so
Prints max |error| against a float32 reference for each epilogue, with ragged row counts, then
the time and TFLOP/s of each Mistral-7B prefill GEMM of 4096 tokens next to torch (cuBLAS).
Exits non-zero when a case is outside its tolerance.
"""

import ctypes
import sys

import torch
import torch.nn.functional as F
from cuda_timing import median_ms

lib = ctypes.CDLL(sys.argv[1])
P = ctypes.c_void_p
EPI = {"plain": 0, "residual": 1, "silu": 2}
maps = torch.zeros(32, dtype=torch.int64, device="cuda")  # two 128-byte TMA descriptors


def ptr(t):
    """A tensor's device address for ctypes (None: a null pointer)."""
    return P(t.data_ptr()) if t is not None else P(0)


def gemm(x, w, epi, aux=None):
    """Compute y = x w^T with the epilogue, by the harness."""
    m, k = x.shape
    n = w.shape[0] // 2 if epi == "silu" else w.shape[0]
    y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    rc = lib.launch_gemm(k, EPI[epi], m, n, ptr(x), ptr(w), ptr(y), ptr(aux), ptr(maps))
    assert rc == 0, f"launch failed: {rc}"
    return y


def reference(x, w, epi, aux):
    """The same in float32."""
    y = x.float() @ w.float().T
    if epi == "residual":
        y = y + aux.float()
    if epi == "silu":
        g, u = y.chunk(2, dim=1)
        y = F.silu(g) * u
    return y


torch.manual_seed(0)
bad = 0
# (m, k, weight rows, epilogue): ragged m (partial and odd tile counts), weights not a multiple
# of the tile, and every epilogue
cases = [(4096, 128, 256, "plain"), (1000, 4096, 512, "plain"), (77, 128, 384, "silu"),
         (300, 4096, 1024, "silu"), (129, 4096, 768, "residual"), (1, 4096, 200, "plain"),
         (4096, 14336, 512, "residual"), (2100, 4096, 4096, "plain")]
for m, k, nw, epi in cases:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.randn(nw, k, device="cuda", dtype=torch.float16) * k ** -0.5
    n = nw // 2 if epi == "silu" else nw
    aux = torch.randn(m, n, device="cuda", dtype=torch.float16) if epi == "residual" else None
    ref = reference(x, w, epi, aux)
    y = gemm(x, w, epi, aux)
    torch.cuda.synchronize()
    err = (y.float() - ref).abs().max().item()
    ok = err < 2e-2 and not y.isnan().any().item()
    bad += not ok
    print(f"m={m:5d} k={k:5d} n={n:5d} {epi:8s} max|err| {err:.2e} {'ok' if ok else 'FAIL'}",
          flush=True)

print("\n4096-token prefill GEMMs of Mistral-7B (ms, TFLOP/s):")
shapes = [("qkv", 6144, 4096, "plain"), ("o", 4096, 4096, "residual"),
          ("gate_up", 28672, 4096, "silu"), ("down", 4096, 14336, "residual")]
ours = theirs = 0.0
for name, nw, k, epi in shapes:
    m = 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.randn(nw, k, device="cuda", dtype=torch.float16) * k ** -0.5
    n = nw // 2 if epi == "silu" else nw
    aux = torch.randn(m, n, device="cuda", dtype=torch.float16) if epi == "residual" else None
    flops = 2 * m * nw * k
    t = median_ms(lambda x=x, w=w, epi=epi, aux=aux: gemm(x, w, epi, aux))
    ref = median_ms(lambda x=x, w=w: F.linear(x, w))
    ours, theirs = ours + t, theirs + ref
    print(f"{name:8s} ours {t:.3f} ms {flops / t / 1e9:4.0f} | torch (no epilogue) "
          f"{ref:.3f} ms {flops / ref / 1e9:4.0f}", flush=True)
print(f"per layer: ours {ours:.3f} ms, torch {theirs:.3f} ms")
sys.exit(1 if bad else 0)
