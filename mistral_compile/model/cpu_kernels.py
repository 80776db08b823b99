"""Our CPU kernels: TIR written for LLVM to vectorize, parallel over TVM's thread pool.

Projection weights are stored in panels on CPU, ``Wp[N / P, K, P]`` with ``Wp[o, k, p] =
W[o * P + p, k]`` (weights/panels.py; the engine packs them at load): a k step of a panel is P
consecutive floats, one vector FMA per row of x, so the same kernel is the decode GEMV (m = 1,
at memory bandwidth) and the prefill GEMM (MR rows of x at a time, accumulators in registers).
P and MR come from the target's vector width (``cpu_tile``). 4-bit weights are packed the same
way (their uint32 words, float16 scales and minimums), and decode reads them packed.

Small per-task buffers are "global" scope: under 1 KB TVM puts them on the stack and LLVM
keeps them in registers ("local" goes to the heap on CPU).
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from mistral_compile.weights.panels import packable  # noqa: F401 (used by MistralLinear)
from mistral_compile.weights.quantize import GROUP, MAX_INT, PER_WORD

# CPU level -> (panel width P in floats, rows of x per GEMM tile MR): 2 vectors per row, 2*MR
# accumulators plus the weight vectors must fit the register file (16 ymm / 32 zmm)
TILES = {"x86-64": (8, 4), "x86-64-v3": (16, 6), "x86-64-v4": (32, 7)}
ROWS_PER_TASK = 8  # rows-layout GEMV: weight rows per task
LANES = 16  # rows-layout GEMV: partial sums per row (k must be a multiple)
KEY_BLOCK = 32  # attention: keys scored per block of the online softmax


def on_cpu() -> bool:
    """Whether the current target is a CPU (llvm) one."""
    target = Target.current(allow_none=True)
    return target is not None and target.kind.name == "llvm"


def cpu_tile() -> tuple[int, int]:
    """(P, MR) for the current llvm target's level (generic x86-64 when it names none)."""
    target = Target.current(allow_none=True)
    mcpu = str(target.attrs.get("mcpu", "")) if target is not None else ""
    return TILES.get(mcpu, TILES["x86-64"])


@functools.cache
def gemm_packed(n: int, k: int, panel: int, rows: int, x_dtype: str, w_dtype: str,
                out_dtype: str) -> tirx.PrimFunc:
    """y[m, n] = x[m, k] @ W[n, k]^T with W in panels; m symbolic (1 at decode)."""
    no = n // panel

    @T.prim_func(private=True, s_tir=True)
    def func(x_handle: T.handle, wp: T.Buffer((no, k, panel), w_dtype), y_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        x = T.match_buffer(x_handle, (m, k), x_dtype)
        y = T.match_buffer(y_handle, (m, n), out_dtype)
        with T.sblock("root"):
            for jo in T.parallel(no):
                acc = T.sblock_alloc_buffer((rows, panel), "float32")
                for io in range(m // rows):
                    for ii in T.unroll(rows):
                        for ji in T.vectorized(panel):
                            acc[ii, ji] = T.float32(0)
                    for kk in range(k):
                        for ii in T.unroll(rows):
                            for ji in T.vectorized(panel):
                                acc[ii, ji] = acc[ii, ji] + T.Cast(
                                    "float32", x[io * rows + ii, kk]) * T.Cast(
                                    "float32", wp[jo, kk, ji])
                    for ii in T.unroll(rows):
                        for ji in T.vectorized(panel):
                            y[io * rows + ii, jo * panel + ji] = T.Cast(out_dtype, acc[ii, ji])
                for it in range(m % rows):
                    for ji in T.vectorized(panel):
                        acc[0, ji] = T.float32(0)
                    for kk in range(k):
                        for ji in T.vectorized(panel):
                            acc[0, ji] = acc[0, ji] + T.Cast(
                                "float32", x[m // rows * rows + it, kk]) * T.Cast(
                                "float32", wp[jo, kk, ji])
                    for ji in T.vectorized(panel):
                        y[m // rows * rows + it, jo * panel + ji] = T.Cast(out_dtype, acc[0, ji])

    return func


def gemv_rows_supported(n: int, k: int) -> bool:
    """Whether gemv_rows takes a [n, k] weight."""
    return n % ROWS_PER_TASK == 0 and k % LANES == 0


@functools.cache
def gemv_rows(n: int, k: int, x_dtype: str, w_dtype: str, out_dtype: str) -> tirx.PrimFunc:
    """y[1, n] = x[1, k] @ W[n, k]^T on the row layout (the tied embedding as LM head)."""
    rows, lanes = ROWS_PER_TASK, LANES

    @T.prim_func(private=True, s_tir=True)
    def func(x: T.Buffer((1, k), x_dtype), w: T.Buffer((n, k), w_dtype),
             y: T.Buffer((1, n), out_dtype)):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        with T.sblock("root"):
            xf = T.sblock_alloc_buffer((k,), "float32")
            for kk in range(k):
                xf[kk] = T.Cast("float32", x[0, kk])
            for jo in T.parallel(n // rows):
                acc = T.sblock_alloc_buffer((rows, lanes), "float32")
                total = T.sblock_alloc_buffer((1,), "float32")
                for r in T.unroll(rows):
                    for ln in T.vectorized(lanes):
                        acc[r, ln] = T.float32(0)
                for ko in range(k // lanes):
                    for r in T.unroll(rows):
                        for ln in T.vectorized(lanes):
                            acc[r, ln] = acc[r, ln] + xf[ko * lanes + ln] * T.Cast(
                                "float32", w[jo * rows + r, ko * lanes + ln])
                for r in T.unroll(rows):
                    total[0] = T.float32(0)
                    for ln in T.unroll(lanes):
                        total[0] = total[0] + acc[r, ln]
                    y[0, jo * rows + r] = T.Cast(out_dtype, total[0])

    return func


def _nibble(word: tirx.PrimExpr, j: int | tirx.PrimExpr) -> tirx.PrimExpr:
    """Element j (0..7) of a q4f16_1 word as float32 code 0..15 (weights/quantize.py's SHIFTS)."""
    shift = (j // 2) * 4 + (j % 2) * 16
    return T.Cast("float32", T.Cast("int32", T.bitwise_and(
        T.shift_right(word, T.Cast("uint32", shift)), T.uint32(15))))


def _group_min(qs: tirx.Buffer, qm: tirx.Buffer, jo: tirx.PrimExpr, g: tirx.PrimExpr,
               ji: tirx.PrimExpr, with_min: bool) -> tirx.PrimExpr:
    """A group's offset in w = q * scale + offset: q4f16_2's min, or q4f16_1's -7 * scale."""
    if with_min:
        return T.Cast("float32", qm[jo, g, ji])
    return T.float32(-MAX_INT) * T.Cast("float32", qs[jo, g, ji])


@functools.cache
def gemv_q4_packed(n: int, k: int, panel: int, x_dtype: str, out_dtype: str,
                   with_min: bool = False) -> tirx.PrimFunc:
    """y[1, n] = x[1, k] @ W^T, W 4-bit in panels: words [n/P, k/8, P], scales [n/P, k/32, P].

    Per group of 32 inputs, with w = q * s + o (q4f16_1: o = -7 s; q4f16_2: o = its min):
    sum_j x_j w_j = s * sum_j x_j q_j + o * sum_j x_j, so the codes multiply x directly and the
    scale and offset apply once per group. ``qm`` is the minimums (q4f16_1: unused; any
    [n/P, k/32, P] float16 tensor, the scales themselves).
    """
    no, groups, words = n // panel, k // GROUP, GROUP // PER_WORD
    parts = 4  # independent partial sums per group (hides the FMA latency)

    @T.prim_func(private=True, s_tir=True)
    def func(x: T.Buffer((1, k), x_dtype), qw: T.Buffer((no, k // PER_WORD, panel), "uint32"),
             qs: T.Buffer((no, groups, panel), "float16"),
             qm: T.Buffer((no, groups, panel), "float16"), y: T.Buffer((1, n), out_dtype)):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        with T.sblock("root"):
            xf = T.sblock_alloc_buffer((k,), "float32")
            xsum = T.sblock_alloc_buffer((groups,), "float32")
            for g in range(groups):
                xsum[g] = T.float32(0)
                for e in range(GROUP):
                    xf[g * GROUP + e] = T.Cast("float32", x[0, g * GROUP + e])
                    xsum[g] = xsum[g] + xf[g * GROUP + e]
            for jo in T.parallel(no):
                acc = T.sblock_alloc_buffer((panel,), "float32")
                part = T.sblock_alloc_buffer((parts, panel), "float32")
                for ji in T.vectorized(panel):
                    acc[ji] = T.float32(0)
                for g in range(groups):
                    for pp in T.unroll(parts):
                        for ji in T.vectorized(panel):
                            part[pp, ji] = T.float32(0)
                    for wd in T.unroll(words):
                        for e1 in T.unroll(PER_WORD // parts):
                            for pp in T.unroll(parts):
                                for ji in T.vectorized(panel):
                                    part[pp, ji] = part[pp, ji] + xf[
                                        g * GROUP + wd * PER_WORD + e1 * parts + pp] * _nibble(
                                        qw[jo, g * words + wd, ji], e1 * parts + pp)
                    for ji in T.vectorized(panel):
                        acc[ji] = acc[ji] + (part[0, ji] + part[1, ji] + part[2, ji]
                                             + part[3, ji]) * T.Cast("float32", qs[jo, g, ji]) \
                            + xsum[g] * _group_min(qs, qm, jo, g, ji, with_min)
                for ji in T.vectorized(panel):
                    y[0, jo * panel + ji] = T.Cast(out_dtype, acc[ji])

    return func


@functools.cache
def dequantize_q4_packed(n: int, k: int, panel: int, with_min: bool = False) -> tirx.PrimFunc:
    """4-bit panels -> float32 panels [n/P, k, P] (for the prefill GEMM); ``qm`` as gemv_q4."""
    no, groups = n // panel, k // GROUP

    @T.prim_func(private=True, s_tir=True)
    def func(qw: T.Buffer((no, k // PER_WORD, panel), "uint32"),
             qs: T.Buffer((no, groups, panel), "float16"),
             qm: T.Buffer((no, groups, panel), "float16"),
             wp: T.Buffer((no, k, panel), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        with T.sblock("root"):
            for jo in T.parallel(no):
                for wd in range(k // PER_WORD):
                    for e in T.unroll(PER_WORD):
                        for ji in T.vectorized(panel):
                            wp[jo, wd * PER_WORD + e, ji] = _nibble(qw[jo, wd, ji], e) * T.Cast(
                                "float32", qs[jo, wd * PER_WORD // GROUP, ji]) + _group_min(
                                qs, qm, jo, wd * PER_WORD // GROUP, ji, with_min)

    return func


@functools.cache
def take_rows_packed(vocab: int, hidden: int, panel: int, dtype: str) -> tirx.PrimFunc:
    """out[i, :] = W[ids[i], :] with W [vocab, hidden] in panels (a tied embedding on CPU)."""
    no = vocab // panel

    @T.prim_func(private=True, s_tir=True)
    def func(ids_handle: T.handle, wp: T.Buffer((no, hidden, panel), dtype),
             out_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        ids = T.match_buffer(ids_handle, (m,), "int32")
        out = T.match_buffer(out_handle, (m, hidden), dtype)
        with T.sblock("root"):
            for i in range(m):
                for h in range(hidden):
                    out[i, h] = wp[ids[i] // panel, h, ids[i] % panel]

    return func
