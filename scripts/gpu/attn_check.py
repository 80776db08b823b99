"""Test and time mc::prefill_attn_ragged alone (scripts/gpu/attn_harness.cu) against float64.

Usage on the GPU machine: python3 scripts/gpu/attn_check.py HARNESS.so
Prints max |error| of output and log-sum-exp per case, then the kernel's time and TFLOP/s on a
4096-token causal prefill of the Mistral-7B shape next to torch's scaled_dot_product_attention,
and the owned cache's kernels (mc::prefill_attn_owned, and mc::prefill_attn_owned_wgmma on
Hopper, also against float64 with prefixes, windows and a wrapped ring) on the same rows.
Exits non-zero when a case is outside its tolerance.
"""

import ctypes
import math
import sys

import torch
from cuda_timing import median_ms

lib = ctypes.CDLL(sys.argv[1])
P = ctypes.c_void_p


def ptr(t):
    """A tensor's device address for ctypes (None: a null pointer)."""
    return P(t.data_ptr()) if t is not None else P(0)


def rope(x, pos, theta=10000.0):
    """Rotate-half RoPE of x [n, h, d] (float64) at positions pos, TVM's frequencies."""
    d = x.shape[-1]
    inv = 1.0 / theta ** ((2 * torch.arange(d, dtype=torch.float64, device=x.device) % d) / d)
    ang = pos.double()[:, None] * inv[None, :]
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * torch.cos(ang)[:, None] + rot * torch.sin(ang)[:, None]


_indptr = {}


def indptr(lengths):
    """Row offsets of ragged sequences, int32 on the GPU (cached)."""
    if tuple(lengths) not in _indptr:
        _indptr[tuple(lengths)] = torch.tensor(
            [0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return _indptr[tuple(lengths)]


def run(q, k, v, q_lens, kv_lens, causal, rotary, h_qo, h_kv, d, q_pos=None, k_off=None,
        out=None, lse=None):
    """Launch the harness; returns (output, base-2 lse)."""
    q_indptr, kv_indptr = indptr(q_lens), indptr(kv_lens)
    if out is None:
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    k_rot = torch.empty_like(k)
    rc = lib.launch_ragged(d, h_qo // h_kv, h_qo, q.shape[0], k.shape[0], ptr(k_rot), ptr(q),
                           ptr(q_indptr), ptr(k), ptr(v), ptr(kv_indptr), ptr(q_pos),
                           ptr(k_off), ptr(out), ptr(lse),
                           len(q_lens), int(causal), int(rotary), ctypes.c_float(1.0),
                           ctypes.c_float(10000.0), ctypes.c_float(d ** -0.5))
    assert rc == 0, rc
    return out, lse


def reference(q, k, v, q_lens, kv_lens, causal, rotary, h_qo, h_kv, d, q_pos, k_off):
    """The same attention in float64."""
    outs, lses, qa, ka = [], [], 0, 0
    for i, (n, m) in enumerate(zip(q_lens, kv_lens, strict=True)):
        qi, ki, vi = (x.double() for x in (q[qa:qa + n], k[ka:ka + m], v[ka:ka + m]))
        if rotary:
            qi = rope(qi, q_pos[qa:qa + n])
            ki = rope(ki, k_off[i] + torch.arange(m, device=q.device))
        g = h_qo // h_kv
        ki, vi = ki.repeat_interleave(g, 1), vi.repeat_interleave(g, 1)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * d ** -0.5
        if causal:
            mask = torch.arange(m, device=q.device)[None, :] > (
                torch.arange(n, device=q.device)[:, None] + m - n)
            s = s.masked_fill(mask[None], float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vi))
        lses.append((torch.logsumexp(s, -1) / math.log(2)).T)
        qa, ka = qa + n, ka + m
    return torch.cat(outs), torch.cat(lses)


def case(name, q_lens, kv_lens, causal, rotary, h_qo, h_kv, d, tol=2e-3):
    """Run one case against float64 and print its errors; True when within tolerance."""
    gen = torch.Generator(device="cuda").manual_seed(sum(q_lens) + d)
    dev = "cuda"
    q = torch.randn(sum(q_lens), h_qo, d, device=dev, generator=gen).half()
    k = torch.randn(sum(kv_lens), h_kv, d, device=dev, generator=gen).half()
    v = torch.randn(sum(kv_lens), h_kv, d, device=dev, generator=gen).half()
    q_pos = k_off = None
    if rotary:
        k_off = torch.randint(0, 3000, (len(q_lens),), device=dev, dtype=torch.int32)
        q_pos = torch.cat([o + m - n + torch.arange(n, device=dev, dtype=torch.int32)
                           for o, n, m in zip(k_off.tolist(), q_lens, kv_lens, strict=True)])
    out, lse = run(q, k, v, q_lens, kv_lens, causal, rotary, h_qo, h_kv, d, q_pos, k_off)
    torch.cuda.synchronize()
    want, want_lse = reference(q, k, v, q_lens, kv_lens, causal, rotary, h_qo, h_kv, d, q_pos,
                               k_off)
    err = (out.double() - want).abs().max().item()
    lerr = (lse.double() - want_lse).abs().max().item()
    ok = err < tol and lerr < 1e-2
    print(f"{'ok ' if ok else 'BAD'} {name}: max|out err| {err:.2e}, max|lse err| {lerr:.2e}")
    return ok


def owned_against_ragged(q, k, v, h_qo, h_kv, d, flops):
    """The owned cache's kernel on the same causal chunk (keys already rotated, as stored)."""
    s = q.shape[0]
    cap = -(-s // 64) * 64
    state = torch.zeros(1, 2, h_kv, cap, d, device="cuda", dtype=torch.float16)
    state[0, 0, :, :s] = k.transpose(0, 1)
    state[0, 1, :, :s] = v.transpose(0, 1)
    length = torch.zeros(1, device="cuda", dtype=torch.int32)
    out = torch.full_like(q, float("nan"))

    def go():
        rc = lib.launch_owned(d, h_qo // h_kv, h_qo, s, ptr(q), ptr(length), ptr(state), cap, 0,
                              ptr(out), ctypes.c_float(d ** -0.5))
        assert rc == 0, rc

    go()
    want, _ = run(q, k, v, [s], [s], True, False, h_qo, h_kv, d)
    err = (out.float() - want.float()).abs().max().item()
    ok = err < 2e-3
    print(f"{'ok ' if ok else 'BAD'} owned kernel vs ragged kernel, {s} rows: max|out diff| "
          f"{err:.2e}")
    ms = median_ms(go)
    print(f"ours owned cache: {ms:.3f} ms per layer, {flops / ms / 1e9:.0f} TFLOP/s")
    return ok


def owned_state(k_all, v_all, layers, layer, cap, gen):
    """A [layers, 2, h_kv, cap, d] cache holding k_all/v_all's positions at layer `layer`.

    Position p sits in slot p % cap (later positions overwrite earlier ones); every other slot
    holds finite noise.
    """
    h_kv, d = k_all.shape[1], k_all.shape[2]
    state = torch.randn(layers, 2, h_kv, cap, d, device="cuda", generator=gen).half()
    for p0 in range(0, k_all.shape[0], cap):  # in slot order, the latest position last
        rows = slice(p0, min(p0 + cap, k_all.shape[0]))
        n = rows.stop - rows.start
        state[layer, 0, :, :n] = k_all[rows].transpose(0, 1)
        state[layer, 1, :, :n] = v_all[rows].transpose(0, 1)
    return state


def windowed_reference(q, k_all, v_all, base, window, d):
    """float64: row i at position base + i over keys [max(0, p - window + 1), p]."""
    n, h_qo = q.shape[0], q.shape[1]
    g = h_qo // k_all.shape[1]
    ki = k_all.double().repeat_interleave(g, 1)
    vi = v_all.double().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), ki) * d ** -0.5
    pos = base + torch.arange(n, device=q.device)[:, None]
    j = torch.arange(k_all.shape[0], device=q.device)[None, :]
    hidden = (j > pos) | ((j <= pos - window) if window > 0 else torch.zeros_like(j > pos))
    s = s.masked_fill(hidden[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vi)


_maps = torch.zeros(128, dtype=torch.uint8, device="cuda")


def run_wgmma(q, state, layer, cap, window, base, out=None):
    """mc::prefill_attn_owned_wgmma over `state` (the harness's launch_owned_wgmma)."""
    layers, h_kv, d = state.shape[0], state.shape[2], state.shape[4]
    h_qo = q.shape[1]
    length = torch.tensor([base], device="cuda", dtype=torch.int32)
    if out is None:
        out = torch.full_like(q, float("nan"))
    rc = lib.launch_owned_wgmma(h_qo // h_kv, h_qo, q.shape[0], ptr(q), ptr(length), ptr(state),
                                layers, layer, cap, window, ptr(out), ctypes.c_float(d ** -0.5),
                                ptr(_maps))
    assert rc == 0, rc
    return out


def wgmma_case(name, n, base, window, h_qo=32, h_kv=8, d=128, tol=2e-3):
    """The Hopper kernel against float64 on a chunk of n rows after `base` cached tokens."""
    gen = torch.Generator(device="cuda").manual_seed(n + base + window)
    total = base + n
    slots = (window - 1 + n) if window > 0 else total
    cap = -(-slots // 64) * 64
    q = torch.randn(n, h_qo, d, device="cuda", generator=gen).half()
    k_all = torch.randn(total, h_kv, d, device="cuda", generator=gen).half()
    v_all = torch.randn(total, h_kv, d, device="cuda", generator=gen).half()
    state = owned_state(k_all, v_all, 2, 1, cap, gen)
    out = run_wgmma(q, state, 1, cap, window, base)
    torch.cuda.synchronize()
    want = windowed_reference(q, k_all, v_all, base, window, d)
    err = (out.double() - want).abs().max().item()
    ok = err < tol
    print(f"{'ok ' if ok else 'BAD'} wgmma {name} (n {n}, base {base}, window {window}, cap {cap}, "
          f"heads {h_qo}/{h_kv}): max|out err| {err:.2e}")
    return ok


def wgmma_against_mma(q, k, v, h_qo, h_kv, d, flops):
    """The Hopper kernel on the timing chunk: output against the mma.sync kernel's, and time."""
    s = q.shape[0]
    state = torch.zeros(1, 2, h_kv, s, d, device="cuda", dtype=torch.float16)
    state[0, 0] = k.transpose(0, 1)
    state[0, 1] = v.transpose(0, 1)
    length = torch.zeros(1, device="cuda", dtype=torch.int32)
    old = torch.full_like(q, float("nan"))
    rc = lib.launch_owned(d, h_qo // h_kv, h_qo, s, ptr(q), ptr(length), ptr(state), s, 0,
                          ptr(old), ctypes.c_float(d ** -0.5))
    assert rc == 0, rc
    out = run_wgmma(q, state, 0, s, 0, 0)
    torch.cuda.synchronize()
    err = (out.float() - old.float()).abs().max().item()
    ok = err < 2e-3
    print(f"{'ok ' if ok else 'BAD'} wgmma kernel vs mma.sync owned kernel, {s} rows: "
          f"max|out diff| {err:.2e}")
    ms = median_ms(lambda: run_wgmma(q, state, 0, s, 0, 0, out))
    print(f"ours owned cache, wgmma: {ms:.3f} ms per layer, {flops / ms / 1e9:.0f} TFLOP/s")
    return ok


def main():
    """Correctness cases, then timing."""
    ok = True
    ok &= case("7b one seq 4096 causal", [4096], [4096], True, False, 32, 8, 128)
    ok &= case("7b one seq 4096 causal rope", [4096], [4096], True, True, 32, 8, 128)
    ok &= case("7b ragged 5 seqs causal", [100, 1, 300, 257, 129], [100, 1, 300, 257, 129],
               True, False, 32, 8, 128)
    ok &= case("7b ragged rope", [77, 513, 3], [77, 513, 3], True, True, 32, 8, 128)
    ok &= case("7b q shorter than kv, causal", [70, 5], [300, 64], True, False, 32, 8, 128)
    ok &= case("7b not causal", [70, 200], [300, 33], False, False, 32, 8, 128)
    ok &= case("tiny d16 g2", [37, 130], [37, 130], True, True, 4, 2, 16)
    ok &= case("d64 g1", [200], [200], True, False, 8, 8, 64)
    ok &= wgmma_case("7b chunk from 0", 4096, 0, 0)
    ok &= wgmma_case("7b short chunk after a prefix", 1000, 3000, 0)
    ok &= wgmma_case("one row", 1, 77, 0)
    ok &= wgmma_case("ragged tile", 130, 5, 0)
    ok &= wgmma_case("window, ring wrapped", 2048, 10000, 4096)
    ok &= wgmma_case("small window", 300, 40, 64)
    ok &= wgmma_case("codestral heads, window", 700, 900, 512, h_qo=48)

    # timing: Mistral-7B shape, one 4096-token causal chunk
    s, h_qo, h_kv, d = 4096, 32, 8, 128
    q = torch.randn(s, h_qo, d, device="cuda").half()
    k = torch.randn(s, h_kv, d, device="cuda").half()
    v = torch.randn(s, h_kv, d, device="cuda").half()
    flops = 4 * s * s * d * h_qo / 2

    for rotary in (0, 1):
        pos = torch.arange(s, device="cuda", dtype=torch.int32)
        off = torch.zeros(1, device="cuda", dtype=torch.int32)
        out, lse = run(q, k, v, [s], [s], True, rotary, h_qo, h_kv, d, pos, off)
        ms = median_ms(lambda r=rotary, p=pos, o=off, y=out, e=lse: run(
            q, k, v, [s], [s], True, r, h_qo, h_kv, d, p, o, y, e))
        print(f"ours rotary={rotary}: {ms:.3f} ms per layer, {flops / ms / 1e9:.0f} TFLOP/s")
    ok &= owned_against_ragged(q, k, v, h_qo, h_kv, d, flops)
    ok &= wgmma_against_mma(q, k, v, h_qo, h_kv, d, flops)
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        qt, kt, vt, is_causal=True, enable_gqa=True))
    print(f"torch sdpa (causal, gqa): {ms:.3f} ms per layer, {flops / ms / 1e9:.0f} TFLOP/s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
