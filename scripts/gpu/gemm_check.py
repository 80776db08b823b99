"""Test and time the GEMMs mc::gemm_wgmma and mc::skinny_partial alone (gemm_harness.cu).

Usage on the GPU machine: python3 scripts/gpu/gemm_check.py HARNESS.so [--decode-only]
Prints max |error| against a float32 reference for each epilogue, with ragged row counts, for
the prefill tiles, the split-K tiles and the skinny kernel; then the time and TFLOP/s of each
Mistral-7B prefill GEMM of 4096 tokens next to torch (cuBLAS); then a batched decode step's
GEMMs (1 to 128 rows) as a fraction of the copy bandwidth measured in the same call.
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


def gemm(x, w, epi, aux=None, y=None):
    """Compute y = x w^T with the epilogue, by the harness."""
    m, k = x.shape
    n = w.shape[0] // 2 if epi == "silu" else w.shape[0]
    if y is None:
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    rc = lib.launch_gemm(k, EPI[epi], m, n, ptr(x), ptr(w), ptr(y), ptr(aux), ptr(maps))
    assert rc == 0, f"launch failed: {rc}"
    return y


ws = torch.empty(64 << 20, dtype=torch.float32, device="cuda")  # split partials, 256 MiB
KINDS = {"wgmma": 0, "skinny": 1}


def split_gemm(x, w, epi, splits, kind, aux=None, y=None):
    """Compute y = x w^T with K split over ``splits`` CTAs (wgmma or skinny), then the epilogue."""
    m, k = x.shape
    n = w.shape[0] // 2 if epi == "silu" else w.shape[0]
    assert splits * m * w.shape[0] <= ws.numel()
    if y is None:
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    rc = lib.launch_split_gemm(KINDS[kind], k, EPI[epi], m, n, splits, ptr(x), ptr(w), ptr(y),
                               ptr(aux), ptr(maps), ptr(ws))
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

# split K (a decode step's rows): (m, k, weight rows, epilogue, splits), both kernels
split_cases = [(1, 4096, 768, "plain", 5), (7, 4096, 1024, "silu", 3),
               (64, 14336, 512, "residual", 8), (100, 4096, 768, "residual", 4),
               (128, 4096, 520, "plain", 16), (65, 4096, 600, "plain", 2),
               (33, 4096, 1024, "silu", 1)]
for m, k, nw, epi, splits in split_cases:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.randn(nw, k, device="cuda", dtype=torch.float16) * k ** -0.5
    n = nw // 2 if epi == "silu" else nw
    aux = torch.randn(m, n, device="cuda", dtype=torch.float16) if epi == "residual" else None
    ref = reference(x, w, epi, aux)
    for kind in KINDS:
        y = split_gemm(x, w, epi, splits, kind, aux)
        torch.cuda.synchronize()
        err = (y.float() - ref).abs().max().item()
        ok = err < 2e-2 and not y.isnan().any().item()
        bad += not ok
        print(f"{kind:6s} m={m:5d} k={k:5d} n={n:5d} {epi:8s} splits {splits:2d} "
              f"max|err| {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)

DECODE_ONLY = "--decode-only" in sys.argv
print("\n4096-token prefill GEMMs of Mistral-7B (ms, TFLOP/s):")
shapes = [("qkv", 6144, 4096, "plain"), ("o", 4096, 4096, "residual"),
          ("gate_up", 28672, 4096, "silu"), ("down", 4096, 14336, "residual")]
ours = theirs = 0.0
for name, nw, k, epi in shapes if not DECODE_ONLY else []:
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

# A batched decode step's GEMMs: the weight read once per step, so the floor is its bytes at
# the copy bandwidth. wgmma: the 128 x 256 tiles without a split; split S: the same tiles with
# K over S CTAs; skinny: mc::skinny_partial at the library's split rule.


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device copy (read + write)."""
    big = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    return 2 * big.numel() * 2 / median_ms(lambda: big.clone()) / 1e6


bandwidth = copy_bandwidth()
print(f"\ncopy bandwidth {bandwidth:.0f} GB/s")
SMS, TARGET_SKINNY = 132, 264


def auto_splits(w_rows, k):
    """The library's rule for the split-K tiles: one wave of one CTA per SM."""
    return max(1, min(k // 64, SMS // -(-w_rows // 256)))


def skinny_rule(w_rows, k):
    """Mirror kernels.skinny_splits."""
    return max(1, min(k // 128, -(-TARGET_SKINNY // -(-w_rows // 64))))


def decode_runs(x, w, epi, aux, y, s0, s_skinny):
    """The variants timed for one projection, by label."""
    return {"wgmma": lambda: gemm(x, w, epi, aux, y),
            f"split {s0}": lambda: split_gemm(x, w, epi, s0, "wgmma", aux, y),
            f"split {2 * s0}": lambda: split_gemm(x, w, epi, 2 * s0, "wgmma", aux, y),
            "skinny": lambda: split_gemm(x, w, epi, s_skinny, "skinny", aux, y),
            "torch": lambda: F.linear(x, w)}


decode = [("7b qkv", 6144, 4096, "plain"), ("7b o", 4096, 4096, "residual"),
          ("7b gate_up", 28672, 4096, "silu"), ("7b down", 4096, 14336, "residual"),
          ("24b qkv", 6144, 5120, "plain"), ("24b o", 5120, 4096, "residual"),
          ("24b gate_up", 65536, 5120, "silu"), ("24b down", 5120, 32768, "residual")]
weights = {name: torch.randn(nw, k, device="cuda", dtype=torch.float16) * k ** -0.5
           for name, nw, k, _ in decode}
for rows in (1, 8, 16, 32, 64, 128):
    totals = {}
    for name, nw, k, epi in decode:
        w = weights[name]
        x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        n = nw // 2 if epi == "silu" else nw
        aux = (torch.randn(rows, n, device="cuda", dtype=torch.float16)
               if epi == "residual" else None)
        floor = nw * k * 2 / bandwidth / 1e6
        s0 = auto_splits(nw, k)
        y = torch.empty(rows, n, device="cuda", dtype=torch.float16)
        runs = decode_runs(x, w, epi, aux, y, s0, skinny_rule(nw, k))
        line = []
        for label, fn in runs.items():
            t = median_ms(fn, reps=7, batch=20)
            key = label if not label.startswith("split") else ("split" if label == f"split {s0}"
                                                                else "split x2")
            totals[(name[:3], key)] = totals.get((name[:3], key), 0.0) + t
            line.append(f"{label} {t * 1e3:6.1f} us {100 * floor / t:3.0f}%")
        print(f"rows {rows:3d} {name:11s} floor {floor * 1e3:6.1f} us | " + " | ".join(line),
              flush=True)
    for model in ("7b ", "24b"):
        print(f"rows {rows:3d} {model} layer: " + ", ".join(
            f"{key} {t * 1e3:.0f} us" for (mm, key), t in totals.items() if mm == model))
sys.exit(1 if bad else 0)
