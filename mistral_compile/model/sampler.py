"""Sampling on the device: the exported ``sample`` and ``top_logprobs`` and their kernels.

Per row of a step's logits: logit bias and penalties (sparse entries), then greedy or
temperature, top-k, top-p, min-p and an exponential race with counter-based noise keyed by
(seed, output index), so a request draws the same tokens alone or in any batch. Only token ids
and logprobs leave the device. The CUDA kernels are mc::sample_* in mc_kernels.cuh; the CPU
ones here follow the same steps; runtime/sampling_ref.py is the numpy definition both are
tested against.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from mistral_compile.abi import (
    MAX_TOP_LOGPROBS,
    NUM_OPTIONS,
    OPT_FREQUENCY,
    OPT_MIN_P,
    OPT_PRESENCE,
    OPT_REPETITION,
    OPT_TEMPERATURE,
    OPT_TOP_K,
    OPT_TOP_P,
)
from mistral_compile.model.kernels import on_cuda

SAMPLE_THREADS = 1024
ONE_BITS = 0x3F800000  # the bit pattern of 1.0f


def sample(logits: Tensor, options: Tensor, rng: Tensor, adjust: Tensor,
           bias: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens [B] int32 and their logprobs under the raw logits [B] float32."""
    b, vocab = logits.shape
    work = op.tensor_ir_op(adjust_cuda(vocab) if on_cuda() else adjust_cpu(vocab),
                           "sample_adjust", args=[logits, options, adjust, bias],
                           out=Tensor.placeholder((b, vocab), "float32"))
    return op.tensor_ir_op(rows_cuda(vocab) if on_cuda() else rows_cpu(vocab), "sample_rows",
                           args=[logits, work, options, rng],
                           out=[Tensor.placeholder((b,), "int32"),
                                Tensor.placeholder((b,), "float32")])


def top_logprobs(logits: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """The k (<= 20, a [1] int32 tensor) most likely tokens per row and their logprobs."""
    b, vocab = logits.shape
    func = top_cuda(vocab) if on_cuda() else top_cpu(vocab)
    return op.tensor_ir_op(func, "top_logprobs", args=[logits, k],
                           out=[Tensor.placeholder((b, MAX_TOP_LOGPROBS), "int32"),
                                Tensor.placeholder((b, MAX_TOP_LOGPROBS), "float32")])


# ---- CUDA: launch stubs ----

@functools.cache
def adjust_cuda(vocab: int) -> tirx.PrimFunc:
    """Logits copied, then the sparse bias and penalty entries (mc::sample_copy, _entries)."""
    @T.prim_func(private=True, s_tir=True)
    def func(logits_h: T.handle, options_h: T.handle, adj_h: T.handle, bias_h: T.handle,
             work_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        b, e = T.int64(), T.int64()
        logits = T.match_buffer(logits_h, (b, vocab), "float32")
        options = T.match_buffer(options_h, (b, NUM_OPTIONS), "float32")
        adj = T.match_buffer(adj_h, (e, 4), "int32")
        bias = T.match_buffer(bias_h, (e,), "float32")
        work = T.match_buffer(work_h, (b, vocab), "float32")
        for _bx in T.thread_binding(T.min(1024, T.ceildiv(b * vocab, 256)), thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("copy"):
                    T.reads(logits[0:b, 0:vocab])
                    T.writes(work[0:b, 0:vocab])
                    T.evaluate(T.call_extern("void", "mc::sample_copy", logits.access_ptr("r"),
                                             b * vocab, work.access_ptr("w")))
        for _bx in T.thread_binding(T.max(1, T.ceildiv(e, 256)), thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("entries"):
                    T.reads(options[0:b, 0:NUM_OPTIONS], adj[0:e, 0:4], bias[0:e])
                    T.writes(work[0:b, 0:vocab])
                    T.evaluate(T.call_extern(
                        "void", "mc::sample_adjust_entries", options.access_ptr("r"),
                        adj.access_ptr("r"), bias.access_ptr("r"), T.Cast("int32", e), vocab,
                        work.access_ptr("rw")))

    return func


@functools.cache
def rows_cuda(vocab: int) -> tirx.PrimFunc:
    """One CTA per row: the token and its logprob (mc::sample_rows)."""
    @T.prim_func(private=True, s_tir=True)
    def func(logits_h: T.handle, work_h: T.handle, options_h: T.handle, rng_h: T.handle,
             token_h: T.handle, logprob_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        b = T.int64()
        logits = T.match_buffer(logits_h, (b, vocab), "float32")
        work = T.match_buffer(work_h, (b, vocab), "float32")
        options = T.match_buffer(options_h, (b, NUM_OPTIONS), "float32")
        rng = T.match_buffer(rng_h, (b, 2), "int32")
        token = T.match_buffer(token_h, (b,), "int32")
        logprob = T.match_buffer(logprob_h, (b,), "float32")
        for _bx in T.thread_binding(b, thread="blockIdx.x"):
            for _tx in T.thread_binding(SAMPLE_THREADS, thread="threadIdx.x"):
                with T.sblock("sample"):
                    T.reads(logits[0:b, 0:vocab], work[0:b, 0:vocab], options[0:b, 0:NUM_OPTIONS],
                            rng[0:b, 0:2])
                    T.writes(token[0:b], logprob[0:b])
                    T.evaluate(T.call_extern(
                        "void", "mc::sample_rows", logits.access_ptr("r"),
                        work.access_ptr("rw"), vocab, options.access_ptr("r"),
                        rng.access_ptr("r"), token.access_ptr("w"), logprob.access_ptr("w")))

    return func


@functools.cache
def top_cuda(vocab: int) -> tirx.PrimFunc:
    """One CTA per row: the k most likely tokens (mc::top_logprobs_rows)."""
    @T.prim_func(private=True, s_tir=True)
    def func(logits_h: T.handle, k: T.Buffer((1,), "int32"), ids_h: T.handle,
             values_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        b = T.int64()
        logits = T.match_buffer(logits_h, (b, vocab), "float32")
        ids = T.match_buffer(ids_h, (b, MAX_TOP_LOGPROBS), "int32")
        values = T.match_buffer(values_h, (b, MAX_TOP_LOGPROBS), "float32")
        for _bx in T.thread_binding(b, thread="blockIdx.x"):
            for _tx in T.thread_binding(SAMPLE_THREADS, thread="threadIdx.x"):
                with T.sblock("top"):
                    T.reads(logits[0:b, 0:vocab], k[0])
                    T.writes(ids[0:b, 0:MAX_TOP_LOGPROBS], values[0:b, 0:MAX_TOP_LOGPROBS])
                    T.evaluate(T.call_extern(
                        "void", "mc::top_logprobs_rows", logits.access_ptr("r"), vocab,
                        T.min(k[0], MAX_TOP_LOGPROBS), ids.access_ptr("w"),
                        values.access_ptr("w"), MAX_TOP_LOGPROBS))

    return func


# ---- CPU: the same steps as loops ----

def _fmix(h: tirx.PrimExpr) -> tirx.PrimExpr:
    h = h ^ (h >> T.uint32(16))
    h = h * T.uint32(0x85EBCA6B)
    h = h ^ (h >> T.uint32(13))
    h = h * T.uint32(0xC2B2AE35)
    return h ^ (h >> T.uint32(16))


def exp_noise(seed: tirx.PrimExpr, step: tirx.PrimExpr, v: tirx.PrimExpr) -> tirx.PrimExpr:
    """Exp(1) noise of token v at (seed, step): mc::exp_noise."""
    h = _fmix(seed ^ _fmix(step ^ _fmix(v * T.uint32(0x9E3779B1) + T.uint32(0x7F4A7C15))))
    u = (T.Cast("float32", h >> T.uint32(8)) + T.float32(0.5)) * T.float32(1.0 / 16777216.0)
    return -T.log(u)


@functools.cache
def adjust_cpu(vocab: int) -> tirx.PrimFunc:
    """Logits copied, then the sparse bias and penalty entries (see mc::sample_adjust_entries)."""
    @T.prim_func(private=True, s_tir=True)
    def func(logits_h: T.handle, options_h: T.handle, adj_h: T.handle, bias_h: T.handle,
             work_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, e = T.int64(), T.int64()
        logits = T.match_buffer(logits_h, (b, vocab), "float32")
        options = T.match_buffer(options_h, (b, NUM_OPTIONS), "float32")
        adj = T.match_buffer(adj_h, (e, 4), "int32")
        bias = T.match_buffer(bias_h, (e,), "float32")
        work = T.match_buffer(work_h, (b, vocab), "float32")
        with T.sblock("root"):
            for r in T.parallel(b):
                for i in range(vocab):
                    work[r, i] = logits[r, i]
            for j in range(e):
                x = T.sblock_alloc_buffer((1,), "float32")
                row: T.int32 = adj[j, 0]
                tok: T.int32 = adj[j, 1]
                x[0] = work[row, tok] + bias[j]
                if adj[j, 3] != 0 and options[row, OPT_REPETITION] != T.float32(1):
                    if x[0] > T.float32(0):
                        x[0] = x[0] / options[row, OPT_REPETITION]
                    else:
                        x[0] = x[0] * options[row, OPT_REPETITION]
                if adj[j, 2] > 0:
                    x[0] = x[0] - options[row, OPT_PRESENCE] - options[row, OPT_FREQUENCY] * \
                        T.Cast("float32", adj[j, 2])
                work[row, tok] = x[0]

    return func


@functools.cache
def rows_cpu(vocab: int) -> tirx.PrimFunc:
    """Per row: the token and its logprob (the steps of mc::sample_rows)."""
    @T.prim_func(private=True, s_tir=True)
    def func(logits_h: T.handle, work_h: T.handle, options_h: T.handle, rng_h: T.handle,
             token_h: T.handle, logprob_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        logits = T.match_buffer(logits_h, (b, vocab), "float32")
        work = T.match_buffer(work_h, (b, vocab), "float32")
        options = T.match_buffer(options_h, (b, NUM_OPTIONS), "float32")
        rng = T.match_buffer(rng_h, (b, 2), "int32")
        token = T.match_buffer(token_h, (b,), "int32")
        logprob = T.match_buffer(logprob_h, (b,), "float32")
        with T.sblock("root"):
            for r in T.parallel(b):
                f = T.sblock_alloc_buffer((4,), "float32")  # max, threshold, sum, best
                n = T.sblock_alloc_buffer((4,), "int32")  # lo, hi, best index, mid
                n[2] = 0
                if options[r, OPT_TEMPERATURE] <= T.float32(0):
                    f[3] = work[r, 0]
                    for i in range(1, vocab):
                        if work[r, i] > f[3]:
                            f[3] = work[r, i]
                            n[2] = i
                else:
                    f[0] = work[r, 0]
                    for i in range(1, vocab):
                        f[0] = T.max(f[0], work[r, i])
                    for i in range(vocab):
                        work[r, i] = T.exp((work[r, i] - f[0]) / options[r, OPT_TEMPERATURE])
                    f[1] = T.float32(0)
                    if options[r, OPT_TOP_K] > T.float32(0) and \
                            options[r, OPT_TOP_K] < T.float32(vocab):
                        n[0] = 0
                        n[1] = ONE_BITS + 1
                        for _ in range(32):
                            if n[1] - n[0] > 1:
                                n[3] = n[0] + (n[1] - n[0]) // 2
                                f[2] = T.float32(0)
                                for i in range(vocab):
                                    if work[r, i] >= T.reinterpret("float32", n[3]):
                                        f[2] = f[2] + T.float32(1)
                                if f[2] >= options[r, OPT_TOP_K]:
                                    n[0] = n[3]
                                else:
                                    n[1] = n[3]
                        f[1] = T.reinterpret("float32", n[0])
                    if options[r, OPT_TOP_P] < T.float32(1):
                        f[3] = T.float32(0)  # the kept mass z
                        for i in range(vocab):
                            if work[r, i] >= f[1]:
                                f[3] = f[3] + work[r, i]
                        n[0] = -1
                        n[1] = ONE_BITS
                        for _ in range(32):
                            if n[1] - n[0] > 1:
                                n[3] = n[0] + (n[1] - n[0]) // 2
                                f[2] = T.float32(0)
                                for i in range(vocab):
                                    if work[r, i] > T.reinterpret("float32", n[3]) and \
                                            work[r, i] >= f[1]:
                                        f[2] = f[2] + work[r, i]
                                if f[2] < options[r, OPT_TOP_P] * f[3]:
                                    n[1] = n[3]
                                else:
                                    n[0] = n[3]
                        f[1] = T.max(f[1], T.reinterpret("float32", n[1]))
                    f[1] = T.max(f[1], options[r, OPT_MIN_P])
                    f[3] = T.float32(-1)
                    for i in range(vocab):
                        if work[r, i] >= f[1] and work[r, i] > T.float32(0):
                            f[2] = work[r, i] / exp_noise(T.Cast("uint32", rng[r, 0]),
                                                          T.Cast("uint32", rng[r, 1]),
                                                          T.Cast("uint32", i))
                            if f[2] > f[3]:
                                f[3] = f[2]
                                n[2] = i
                token[r] = n[2]
                f[0] = logits[r, 0]
                for i in range(1, vocab):
                    f[0] = T.max(f[0], logits[r, i])
                f[2] = T.float32(0)
                for i in range(vocab):
                    f[2] = f[2] + T.exp(logits[r, i] - f[0])
                logprob[r] = logits[r, n[2]] - f[0] - T.log(f[2])

    return func


@functools.cache
def top_cpu(vocab: int) -> tirx.PrimFunc:
    """Per row: the k most likely tokens and their logprobs (first index on ties)."""
    @T.prim_func(private=True, s_tir=True)
    def func(logits_h: T.handle, k: T.Buffer((1,), "int32"), ids_h: T.handle,
             values_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        logits = T.match_buffer(logits_h, (b, vocab), "float32")
        ids = T.match_buffer(ids_h, (b, MAX_TOP_LOGPROBS), "int32")
        values = T.match_buffer(values_h, (b, MAX_TOP_LOGPROBS), "float32")
        with T.sblock("root"):
            for r in T.parallel(b):
                f = T.sblock_alloc_buffer((3,), "float32")  # max, sum, best
                n = T.sblock_alloc_buffer((2,), "int32")  # best index, skip
                f[0] = logits[r, 0]
                for i in range(1, vocab):
                    f[0] = T.max(f[0], logits[r, i])
                f[1] = T.float32(0)
                for i in range(vocab):
                    f[1] = f[1] + T.exp(logits[r, i] - f[0])
                for j in range(MAX_TOP_LOGPROBS):
                    ids[r, j] = 0
                    values[r, j] = T.float32(0)
                    if j < k[0]:
                        f[2] = T.float32(-3.0e38)
                        n[0] = vocab
                        for i in range(vocab):
                            n[1] = 0
                            for q in range(j):
                                if ids[r, q] == i:
                                    n[1] = 1
                            if n[1] == 0 and (logits[r, i] > f[2] or n[0] == vocab):
                                f[2] = logits[r, i]
                                n[0] = i
                        ids[r, j] = n[0]
                        values[r, j] = f[2] - f[0] - T.log(f[1])

    return func
