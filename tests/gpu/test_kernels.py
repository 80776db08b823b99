"""Our CUDA kernels, called directly from the built libraries, against float64 numpy references.

Cache pages that hold no live token are filled with NaN, so any read outside a sequence's rows
shows up in the result. Skipped without a GPU or the prepared dist-gpu/ folder.
"""

import math
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
GPU_DIR = Path(os.environ.get("MISTRAL_COMPILE_GPU_DIR", REPO / "dist-gpu"))
if not torch.cuda.is_available() or not (GPU_DIR / "prepared.json").is_file():
    pytest.skip("needs an NVIDIA GPU and the prepared dist-gpu/ folder", allow_module_level=True)

from mistral_compile.runtime.library import prepare_runtime  # noqa: E402

PAGE = 16
LIBS = {  # name: (library, kv heads, query heads, head dim, dtype)
    "tiny-f32": ("tiny/windowed/q0f32/lib.so", 2, 4, 16, torch.float32),
    "tiny-f16": ("tiny/windowed/q0f16/lib.so", 2, 4, 16, torch.float16),
    "7b-f16": ("7b-window/lib.so", 8, 32, 128, torch.float16),
}


def _function(lib, name):
    import tvm

    prepare_runtime("cuda")
    return tvm.runtime.load_module(str(GPU_DIR / lib)).get_function(name, query_imports=True)


def _rope(x, pos, theta):
    # the angles in float32, as Hugging Face computes them; the rest in float64
    d = x.shape[-1]
    inv = (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
    ang = np.outer(np.asarray(pos, dtype=np.float32), inv).astype(np.float64)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def _case(lengths, h_kv, h_qo, d, dtype, sliding, seed):
    """Random paged cache: shuffled pages, NaN wherever no live token is; the float64 answer."""
    rng = np.random.default_rng(seed)
    group, theta, sm_scale = h_qo // h_kv, 10000.0, d ** -0.5
    rotary = 1 if sliding else 0
    b = len(lengths)
    # sliding: (window offset inside the first page, sinks) per sequence
    sinks = [min(int(rng.integers(0, 5)), n) if sliding else 0 for n in lengths]
    offsets = [int(rng.integers(s, PAGE)) if sliding else 0 for s in sinks]
    slots = [off + n - s for off, n, s in zip(offsets, lengths, sinks, strict=True)]
    pages_per = [max(1, -(-sl // PAGE)) for sl in slots]
    n_pages = sum(pages_per) + 3
    order = rng.permutation(n_pages)[:sum(pages_per)]
    pages = np.full((n_pages, 2, h_kv, PAGE, d), np.nan)
    q = rng.standard_normal((b, h_qo, d))
    k_rope = rng.integers(0, 50, b) if sliding else np.zeros(b, np.int64)
    q_rope = k_rope + np.asarray(lengths) + rng.integers(0, 3, b)
    want, lse, indptr, at = np.zeros((b, h_qo, d)), np.zeros((b, h_qo)), [0], 0
    for i, n in enumerate(lengths):
        mine = order[at:at + pages_per[i]]
        at += pages_per[i]
        indptr.append(at)
        kv = rng.standard_normal((n, 2, h_kv, d))
        for r in range(n):  # row r of the attention lives at cache offset off(r)
            off = r if r < sinks[i] else r - sinks[i] + offsets[i]
            pages[mine[off // PAGE], :, :, off % PAGE] = kv[r]
        kv = kv.astype(dtype_np(dtype)).astype(np.float64)
        keys = kv[:, 0]
        qi = q[i].astype(dtype_np(dtype)).astype(np.float64)
        if rotary:
            keys = _rope(keys.transpose(1, 0, 2), k_rope[i] + np.arange(n), theta)
            keys = keys.transpose(1, 0, 2)
            qi = _rope(qi, [q_rope[i]] * h_qo, theta)
        for h in range(h_qo):
            s = keys[:, h // group] @ qi[h] * sm_scale
            p = np.exp(s - s.max())
            want[i, h] = p @ kv[:, 1, h // group] / p.sum()
            lse[i, h] = (s.max() + math.log(p.sum())) / math.log(2)
    last = [sl - (pp - 1) * PAGE for sl, pp in zip(slots, pages_per, strict=True)]
    info = np.array([last, offsets, sinks] if sliding else last, dtype=np.int32)
    t = {"q": q, "pages": pages}
    dev = {k: torch.tensor(v, dtype=dtype, device="cuda") for k, v in t.items()}
    pad = torch.zeros(5, dtype=torch.int32, device="cuda")  # views with an element offset
    ints = {"indptr": indptr, "values": order, "k_rope": k_rope, "q_rope": q_rope}
    for k, v in ints.items():
        dev[k] = torch.cat([pad, torch.tensor(np.asarray(v), dtype=torch.int32,
                                              device="cuda")])[5:]
    dev["info"] = torch.tensor(info, device="cuda")
    return dev, rotary, theta, sm_scale, want, lse


def dtype_np(dtype):
    return np.float16 if dtype == torch.float16 else np.float32


CASES = {"one short": [1], "one long": [4100], "batch": [7, 300, 33, 1],
         "page edges": [16, 32, 17]}


@pytest.mark.parametrize("sliding", [False, True], ids=["plain", "sliding"])
@pytest.mark.parametrize("lengths", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("lib", list(LIBS))
def test_decode_attention_matches_float64(lib, lengths, sliding):
    path, h_kv, h_qo, d, dtype = LIBS[lib]
    name = "mc_batch_decode_paged_kv" + ("_sliding_window" if sliding else "")
    f = _function(path, name)
    dev, rotary, theta, sm_scale, want, want_lse = _case(lengths, h_kv, h_qo, d, dtype, sliding,
                                                        seed=len(lengths) * 7 + d)
    out = torch.empty((len(lengths), h_qo, d), dtype=dtype, device="cuda")
    lse = torch.empty((len(lengths), h_qo), dtype=torch.float32, device="cuda")
    f(dev["q"], dev["pages"], dev["indptr"], dev["values"], dev["info"], dev["k_rope"],
      dev["q_rope"], out, lse, rotary, 1.0, theta, sm_scale)
    torch.cuda.synchronize()
    got = out.double().cpu().numpy()
    err = float(np.abs(got - want).max())
    lse_err = float(np.abs(lse.double().cpu().numpy() - want_lse).max())
    print(f"RESULT decode attention {lib} {'sliding' if sliding else 'plain'} {lengths}: "
          f"max|dout| {err:.1e}, max|dlse| {lse_err:.1e}")
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert err <= tol and lse_err <= 1e-3 * (1 if dtype == torch.float32 else 4)



def _rope_t(x, pos, theta):
    # x [n, h, d] float64 on the GPU; TVM's rotate-half frequencies, angles in float32
    d = x.shape[-1]
    inv = (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()
    ang = (pos.float()[:, None].cpu() * inv[None, :]).double().to(x.device)
    ang = torch.cat([ang, ang], -1)
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * torch.cos(ang)[:, None] + rot * torch.sin(ang)[:, None]


PREFILL_CASES = {"one token": [1], "one long": [4100], "batch": [7, 300, 33, 1, 129]}


@pytest.mark.parametrize("causal", [1, 0], ids=["causal", "full"])
@pytest.mark.parametrize("rotary", [0, 1], ids=["stored-rope", "inline-rope"])
@pytest.mark.parametrize("lengths", list(PREFILL_CASES.values()), ids=list(PREFILL_CASES))
@pytest.mark.parametrize("lib", ["tiny-f16", "7b-f16"])
def test_prefill_attention_matches_float64(lib, lengths, rotary, causal):
    # our tensor-core flash-attention prefill (new tokens against themselves), as TVM's cache
    # calls it: ragged rows, index arrays as views with an element offset
    path, h_kv, h_qo, d, dtype = LIBS[lib]
    f = _function(path, "mc_batch_prefill_ragged_kv")
    gen = torch.Generator(device="cuda").manual_seed(len(lengths) * 11 + d + rotary)
    n, theta, sm_scale = sum(lengths), 10000.0, d ** -0.5
    q, k, v = (torch.randn(n, h, d, device="cuda", generator=gen).to(dtype)
               for h in (h_qo, h_kv, h_kv))
    pad = torch.zeros(3, dtype=torch.int32, device="cuda")

    def view(values):
        return torch.cat([pad, torch.tensor(values, dtype=torch.int32, device="cuda")])[3:]

    indptr = [0] + np.cumsum(lengths).tolist()
    k_off = [int(x) for x in np.random.default_rng(len(lengths)).integers(0, 5000, len(lengths))]
    q_pos = [k_off[i] + j for i, m in enumerate(lengths) for j in range(m)]
    out = torch.full_like(q, float("nan"))
    lse = torch.full((n, h_qo), float("nan"), dtype=torch.float32, device="cuda")
    f(q, view(indptr), k, v, view(indptr), view(q_pos), view(k_off), out, lse, causal, rotary,
      1.0, theta, sm_scale)
    torch.cuda.synchronize()
    err = lse_err = 0.0
    for i, m in enumerate(lengths):
        rows = slice(indptr[i], indptr[i + 1])
        qi, ki, vi = (x[rows].double() for x in (q, k, v))
        if rotary:
            pos = torch.arange(m) + k_off[i]
            qi, ki = _rope_t(qi, pos, theta), _rope_t(ki, pos, theta)
        g = h_qo // h_kv
        s = torch.einsum("qhd,khd->hqk", qi, ki.repeat_interleave(g, 1)) * sm_scale
        if causal:
            s = s.masked_fill(torch.ones(m, m, dtype=torch.bool, device="cuda").triu(1),
                              float("-inf"))
        want = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vi.repeat_interleave(g, 1))
        want_lse = (torch.logsumexp(s, -1) / math.log(2)).T
        err = max(err, (out[rows].double() - want).abs().max().item())
        lse_err = max(lse_err, (lse[rows].double() - want_lse).abs().max().item())
    print(f"RESULT prefill attention {lib} rotary={rotary} causal={causal} {lengths}: "
          f"max|dout| {err:.1e}, max|dlse| {lse_err:.1e}")
    assert err <= 4e-3 and lse_err <= 4e-3
