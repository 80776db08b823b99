"""The model-owned KV cache of one sequence: storage, its kernels, and the calls the layers make.

TVM's paged cache is a C++ object that launches its own kernels, so a decode step could not be
one CUDA graph: each layer left the graph for 4 kernels around it (0.3 ms of gaps per 7B step on
the H100). Here the cache is two parameters of the model, written in place by our kernels:

* ``kv_state.storage`` [layers, 2, H_kv, C, D]: the token at absolute position p sits in slot
  p % C, its key rotated (RoPE at p, as Hugging Face) when written. Without a window C covers
  the context; when every layer is windowed it is a ring of at least W - 1 + chunk slots, so the
  window of every row of a prefill chunk is still there.
* ``kv_state.length`` [1] int32: the tokens before the current forward. The engine writes it
  before a prefill; a decode step's last kernel adds one, so greedy steps need no upload.

Attention is exact: query at position p sees keys [p - W + 1, p] (or [0, p]), as Hugging Face.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from mistral_compile.config import MistralConfig
from mistral_compile.errors import ConfigError
from mistral_compile.model.cpu_kernels import KEY_BLOCK
from mistral_compile.model.kernels import (
    CTYPES,
    MAX_SPLITS,
    TARGET_CTAS,
    THREADS,
    VEC,
    on_cuda,
    wgmma_supported,
)

TILE = 64  # the CUDA prefill kernel's key tile (FA_BC): C is a multiple of it
# the Hopper prefill kernel (FW_* in the header): head size, query rows per CTA, threads, and
# its dynamic shared memory (Q, two stages of K and of V, alignment, mbarriers)
FW_D, FW_ROWS, FW_THREADS = 128, 128, 384
FW_SMEM = 128 * 128 * 2 + 2 * 2 * 128 * 128 * 2 + 1024 + 4 * 2 * 8
TMA_MAP_BYTES = 128


def capacity(config: MistralConfig) -> int:
    """Slots per layer: the context, or (every layer windowed) W - 1 + the largest chunk."""
    windows = config.layer_sliding_window_sizes
    if min(windows) > 0:
        window = max(windows)
        slots = window - 1 + min(config.prefill_chunk_size, window - 1)
    else:
        slots = config.context_window_size
    return -(-slots // TILE) * TILE


class KVState(nn.Module):
    """The cache's storage and length, held as parameters (the engine allocates them).

    The model holds it as ``kv_state``, so its parameters' names start with STATE_PREFIX.
    """

    def __init__(self, config: MistralConfig) -> None:
        self.capacity = capacity(config)
        self.storage = nn.Parameter((config.num_hidden_layers, 2, config.num_key_value_heads,
                                     self.capacity, config.head_dim))
        self.length = nn.Parameter((1,), "int32")

    def to(self, dtype: str | None = None) -> None:  # noqa: D102 (the length stays int32)
        self.storage.to(dtype)


class OwnedKVCache:
    """Stands where TVM's PagedKVCache stands in the layers (same ``attention_with_fused_qkv``)."""

    def __init__(self, state: KVState, config: MistralConfig) -> None:
        self.state, self.config = state, config

    def attention_with_fused_qkv(self, layer_id: int, qkv: Tensor, num_qo_heads: int,
                                 sm_scale: float) -> Tensor:
        """Append the rows' keys and values and attend: [b, s, H_q, D] (b = 1)."""
        cfg, state = self.config, self.state
        _, s, heads, d = qkv.shape
        dtype = qkv.dtype
        h_kv = cfg.num_key_value_heads
        window = cfg.layer_sliding_window_sizes[layer_id]
        shape = dict(layers=cfg.num_hidden_layers, cap=state.capacity, h_q=num_qo_heads,
                     h_kv=h_kv, d=d, dtype=dtype)
        layer = tirx.IntImm("int32", layer_id)
        theta, storage, length = float(cfg.position_embedding_base), state.storage, state.length
        if on_cuda():
            check_cuda_shape(cfg, dtype)
        if on_cuda() and isinstance(s, int) and s == 1:
            func = split_kv_cuda(**shape, window=window, theta=theta, sm_scale=sm_scale,
                                 fused=True)
            return op.tensor_ir_op(func, "owned_decode", args=[qkv, storage, length, layer],
                                   out=Tensor.placeholder((1, s, num_qo_heads, d), dtype))
        append = append_cuda if on_cuda() else append_cpu
        q = op.tensor_ir_op(append(**shape, theta=theta), "owned_append",
                            args=[qkv, storage, length, layer],
                            out=Tensor.placeholder((1, s, num_qo_heads, d), dtype))
        if not on_cuda():
            attend = attention_cpu(**shape, window=window, sm_scale=sm_scale)
        elif prefill_wgmma_supported(d, dtype):
            attend = prefill_wgmma_cuda(**shape, window=window, sm_scale=sm_scale)
        elif prefill_tc_supported(d, dtype):
            attend = prefill_cuda(**shape, window=window, sm_scale=sm_scale)
        else:
            attend = split_kv_cuda(**shape, window=window, theta=theta, sm_scale=sm_scale,
                                   fused=False)
        return op.tensor_ir_op(attend, "owned_attention", args=[q, storage, length, layer],
                               out=Tensor.placeholder((1, s, num_qo_heads, d), dtype))


def check_cuda_shape(config: MistralConfig, dtype: str) -> None:
    """Refuse, naming the field, a head layout the CUDA attention kernels do not take."""
    h_q, h_kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if not attention_supported(h_kv, h_q, d, dtype):
        raise ConfigError("num_attention_heads", f"{h_q} query heads over {h_kv} KV heads of "
                          f"head_dim {d} ({dtype}): the CUDA attention kernels take up to 19 "
                          "query heads per KV head at head_dim 128")


def attention_supported(h_kv: int, h_q: int, d: int, dtype: str) -> bool:
    """Whether mc::owned_attn_partial takes this shape.

    16-byte lanes, 2-32 of them per head row, and its per-warp partial outputs in 40 KB of
    shared memory (G <= 19 at D = 128).
    """
    lanes = d // VEC[dtype] if dtype in VEC else 0
    return (dtype in CTYPES and h_q % h_kv == 0 and d % VEC[dtype] == 0 and 2 <= lanes <= 32
            and 32 % lanes == 0 and 4 * (h_q // h_kv) * (d + 2) * 4 <= 40 * 1024)


def prefill_tc_supported(d: int, dtype: str) -> bool:
    """Whether the tensor-core prefill kernel takes this head size and dtype."""
    return dtype == "float16" and d % 16 == 0 and 16 <= d <= 128


def prefill_wgmma_supported(d: int, dtype: str) -> bool:
    """Whether the Hopper prefill kernel applies: an sm_90 target, float16, head_dim 128."""
    return d == FW_D and wgmma_supported(d, dtype)


# ---- CUDA: launch stubs for mc::owned_* (compiler/csrc/mc_kernels.cuh) ----

def _storage_shape(layers: int, h_kv: int, cap: int, d: int) -> tuple[int, ...]:
    return (layers, 2, h_kv, cap, d)


@functools.cache
def split_kv_cuda(layers: int, cap: int, h_q: int, h_kv: int, d: int, dtype: str, window: int,
                  theta: float, sm_scale: float, fused: bool) -> tirx.PrimFunc:
    """Split-KV attention over the cache (mc::owned_attn_partial), then the merge.

    ``fused`` (decode, one row): the input is the fused projection, rotated and appended here,
    and each KV head's keys are split over up to 64 CTAs. Otherwise the rows were appended
    already (``owned_append``: q rotated) and each row takes one split, for prefill in the dtypes
    the tensor-core kernel does not take.
    """
    if fused:
        in_heads, nsplit = h_q + 2 * h_kv, min(MAX_SPLITS, max(1, -(-TARGET_CTAS // h_kv)))
        if nsplit > 32:  # the merge takes up to 32 splits at a time
            nsplit -= nsplit % 32
    else:
        in_heads, nsplit = h_q, 1
    ctype = CTYPES[dtype]
    partial = (f"mc::owned_attn_partial<{ctype}, {d}, {h_q // h_kv}, {h_kv}, "
               f"{'true' if fused else 'false'}>")
    merge = f"mc::owned_merge<{ctype}, {d}, {nsplit}>"

    @T.prim_func(private=True, s_tir=True)
    def func(q_handle: T.handle, storage: T.Buffer(_storage_shape(layers, h_kv, cap, d), dtype),
             length: T.Buffer((1,), "int32"), layer: T.int32, out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n = T.int64()
        q = T.match_buffer(q_handle, (1, n, in_heads, d), dtype)
        out = T.match_buffer(out_handle, (1, n, h_q, d), dtype)
        ws = T.alloc_buffer((n * h_q * nsplit * (d + 2),), "float32")
        for _bx in T.thread_binding(nsplit, thread="blockIdx.x"):
            for _by in T.thread_binding(h_kv, thread="blockIdx.y"):
                for _bz in T.thread_binding(n, thread="blockIdx.z"):
                    for _tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                        with T.sblock("partial"):
                            T.reads(q[0, 0:n, 0:in_heads, 0:d])
                            T.writes(ws[0:n * h_q * nsplit * (d + 2)])
                            T.evaluate(T.call_extern(
                                "void", partial, q.access_ptr("r"), length.access_ptr("r"),
                                storage.access_ptr("rw"), layer, cap, window,
                                ws.access_ptr("rw"), nsplit, T.float32(1.0),
                                T.float32(theta), T.float32(sm_scale)))
        for _hx in T.thread_binding(h_q, thread="blockIdx.x"):
            for _by in T.thread_binding(n, thread="blockIdx.y"):
                for _tx in T.thread_binding(d, thread="threadIdx.x"):
                    with T.sblock("merge"):
                        T.reads(ws[0:n * h_q * nsplit * (d + 2)])
                        T.writes(out[0, 0:n, 0:h_q, 0:d])
                        T.evaluate(T.call_extern("void", merge, ws.access_ptr("r"),
                                                 out.access_ptr("w")))

    return func


@functools.cache
def append_cuda(layers: int, cap: int, h_q: int, h_kv: int, d: int, dtype: str,
                theta: float) -> tirx.PrimFunc:
    """Prefill rows: rotated q out, rotated k and v into their slots (mc::owned_append)."""
    heads = h_q + 2 * h_kv
    extern = f"mc::owned_append<{CTYPES[dtype]}, {d}, {h_q}, {h_kv}>"

    @T.prim_func(private=True, s_tir=True)
    def func(qkv_handle: T.handle, storage: T.Buffer(_storage_shape(layers, h_kv, cap, d), dtype),
             length: T.Buffer((1,), "int32"), layer: T.int32, q_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n = T.int64()
        qkv = T.match_buffer(qkv_handle, (1, n, heads, d), dtype)
        q = T.match_buffer(q_handle, (1, n, h_q, d), dtype)
        for _bx in T.thread_binding(T.max(1, T.ceildiv(n * heads * (d // 16), 256)),
                                    thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("append"):
                    T.reads(qkv[0, 0:n, 0:heads, 0:d])
                    T.writes(q[0, 0:n, 0:h_q, 0:d])
                    T.evaluate(T.call_extern(
                        "void", extern, qkv.access_ptr("r"), length.access_ptr("r"),
                        T.Cast("int32", n), storage.access_ptr("rw"), layer, cap,
                        q.access_ptr("w"), T.float32(1.0), T.float32(theta)))

    return func


@functools.cache
def prefill_cuda(layers: int, cap: int, h_q: int, h_kv: int, d: int, dtype: str, window: int,
                 sm_scale: float) -> tirx.PrimFunc:
    """Tensor-core attention of prefill rows over the cache (mc::prefill_attn_owned)."""
    extern = f"mc::prefill_attn_owned<{d}, {h_q // h_kv}, {h_kv}>"

    @T.prim_func(private=True, s_tir=True)
    def func(q_handle: T.handle, storage: T.Buffer(_storage_shape(layers, h_kv, cap, d), dtype),
             length: T.Buffer((1,), "int32"), layer: T.int32, out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n = T.int64()
        q = T.match_buffer(q_handle, (1, n, h_q, d), dtype)
        out = T.match_buffer(out_handle, (1, n, h_q, d), dtype)
        for _bx in T.thread_binding(T.ceildiv(n, TILE), thread="blockIdx.x"):
            for _by in T.thread_binding(h_q, thread="blockIdx.y"):
                for _tx in T.thread_binding(128, thread="threadIdx.x"):
                    with T.sblock("attention"):
                        T.reads(q[0, 0:n, 0:h_q, 0:d])
                        T.writes(out[0, 0:n, 0:h_q, 0:d])
                        T.evaluate(T.call_extern(
                            "void", extern, q.access_ptr("r"), length.access_ptr("r"),
                            T.Cast("int32", n), storage.access_ptr("r"), layer, cap, window,
                            out.access_ptr("w"), T.float32(sm_scale)))

    return func


@functools.cache
def prefill_wgmma_cuda(layers: int, cap: int, h_q: int, h_kv: int, d: int, dtype: str,
                       window: int, sm_scale: float) -> tirx.PrimFunc:
    """prefill_cuda's contract on Hopper: the cache's TMA descriptor, then the attention.

    mc::prefill_attn_owned_map (one warp) writes the descriptor of the whole storage, then
    mc::prefill_attn_owned_wgmma runs 128 query rows of one head per CTA.
    """
    extern = f"mc::prefill_attn_owned_wgmma<{h_q // h_kv}, {h_kv}>"
    rows = layers * 2 * h_kv * cap

    @T.prim_func(private=True, s_tir=True)
    def func(q_handle: T.handle, storage: T.Buffer(_storage_shape(layers, h_kv, cap, d), dtype),
             length: T.Buffer((1,), "int32"), layer: T.int32, out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n = T.int64()
        q = T.match_buffer(q_handle, (1, n, h_q, d), dtype)
        out = T.match_buffer(out_handle, (1, n, h_q, d), dtype)
        maps = T.alloc_buffer((TMA_MAP_BYTES,), "uint8")
        for _bx in T.thread_binding(1, thread="blockIdx.x"):
            for _tx in T.thread_binding(32, thread="threadIdx.x"):
                with T.sblock("tma_map"):
                    T.reads()
                    T.writes(maps[0:TMA_MAP_BYTES])
                    T.evaluate(T.call_extern("void", "mc::prefill_attn_owned_map",
                                             storage.access_ptr("r"), rows,
                                             maps.access_ptr("w")))
        for _bx in T.thread_binding(T.ceildiv(n, FW_ROWS), thread="blockIdx.x"):
            for _by in T.thread_binding(h_q, thread="blockIdx.y"):
                for _tx in T.thread_binding(FW_THREADS, thread="threadIdx.x"):
                    with T.sblock("attention"):
                        T.reads(maps[0:TMA_MAP_BYTES], q[0, 0:n, 0:h_q, 0:d])
                        T.writes(out[0, 0:n, 0:h_q, 0:d])
                        smem = T.alloc_buffer((FW_SMEM // 2,), "float16", scope="shared.dyn")
                        T.evaluate(T.call_extern(
                            "void", extern, maps.access_ptr("r"), q.access_ptr("r"),
                            length.access_ptr("r"), T.Cast("int32", n), layer, cap, window,
                            out.access_ptr("w"), T.float32(sm_scale), smem.access_ptr("rw")))

    return func


@functools.cache
def argmax_advance_cuda(vocab: int) -> tirx.PrimFunc:
    """The decode step's greedy token, and the cache length + 1 (mc::argmax_advance)."""
    from mistral_compile.model.kernels import ARGMAX_THREADS

    @T.prim_func(private=True, s_tir=True)
    def func(x: T.Buffer((1, 1, vocab), "float32"), length: T.Buffer((1,), "int32"),
             out: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.is_scheduled": True})
        for _bx in T.thread_binding(1, thread="blockIdx.x"):
            for _tx in T.thread_binding(ARGMAX_THREADS, thread="threadIdx.x"):
                with T.sblock("argmax"):
                    T.reads(x[0, 0, 0:vocab])
                    T.writes(out[0])
                    T.evaluate(T.call_extern("void", "mc::argmax_advance", x.access_ptr("r"),
                                             vocab, out.access_ptr("w"),
                                             length.access_ptr("rw")))

    return func


# ---- CPU: the same contracts as plain loops (tests and CPU builds) ----

@functools.cache
def append_cpu(layers: int, cap: int, h_q: int, h_kv: int, d: int, dtype: str,
               theta: float) -> tirx.PrimFunc:
    """Prefill rows: rotated q out, rotated k and v into their slots (float32 arithmetic).

    Rows in parallel; each row's RoPE angles (cos, sin per frequency) are computed once and
    applied to all its heads.
    """
    heads, half = h_q + 2 * h_kv, d // 2

    @T.prim_func(private=True, s_tir=True)
    def func(qkv_handle: T.handle, storage: T.Buffer(_storage_shape(layers, h_kv, cap, d), dtype),
             length: T.Buffer((1,), "int32"), layer: T.int32, q_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        qkv = T.match_buffer(qkv_handle, (1, n, heads, d), dtype)
        q = T.match_buffer(q_handle, (1, n, h_q, d), dtype)
        with T.sblock("root"):
            for r in T.parallel(n):
                cs = T.sblock_alloc_buffer((2, half), "float32")
                pos: T.int32 = length[0] + T.Cast("int32", r)
                slot: T.int32 = T.truncmod(pos, cap)
                for j in range(half):
                    angle: T.float32 = T.Cast("float32", pos) / T.pow(
                        T.float32(theta), T.Cast("float32", 2 * j) / T.float32(d))
                    cs[0, j] = T.cos(angle)
                    cs[1, j] = T.sin(angle)
                for h, j in T.grid(heads, half):
                    a: T.float32 = T.Cast("float32", qkv[0, r, h, j])
                    b: T.float32 = T.Cast("float32", qkv[0, r, h, j + half])
                    lo: T.float32 = a * cs[0, j] - b * cs[1, j]
                    hi: T.float32 = b * cs[0, j] + a * cs[1, j]
                    if h < h_q:
                        q[0, r, h, j] = T.Cast(dtype, lo)
                        q[0, r, h, j + half] = T.Cast(dtype, hi)
                    elif h < h_q + h_kv:
                        storage[layer, 0, h - h_q, slot, j] = T.Cast(dtype, lo)
                        storage[layer, 0, h - h_q, slot, j + half] = T.Cast(dtype, hi)
                    else:
                        storage[layer, 1, h - h_q - h_kv, slot, j] = qkv[0, r, h, j]
                        storage[layer, 1, h - h_q - h_kv, slot, j + half] = \
                            qkv[0, r, h, j + half]

    return func


@functools.cache
def attention_cpu(layers: int, cap: int, h_q: int, h_kv: int, d: int, dtype: str, window: int,
                  sm_scale: float) -> tirx.PrimFunc:
    """Attention of rows already appended, one (row, head) per task, float32.

    Keys are scored in blocks of KEY_BLOCK (an online softmax: the running max and sum are
    rescaled once per block); the dot products and the value sums are vectorized over d.
    """
    group = h_q // h_kv
    span = window - 1 if window > 0 else 1 << 30  # a row sees keys [pos - span, pos]
    blk = KEY_BLOCK

    @T.prim_func(private=True, s_tir=True)
    def func(q_handle: T.handle, storage: T.Buffer(_storage_shape(layers, h_kv, cap, d), dtype),
             length: T.Buffer((1,), "int32"), layer: T.int32, out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        q = T.match_buffer(q_handle, (1, n, h_q, d), dtype)
        out = T.match_buffer(out_handle, (1, n, h_q, d), dtype)
        with T.sblock("root"):
            for task in T.parallel(n * h_q):
                qf = T.sblock_alloc_buffer((d,), "float32")
                acc = T.sblock_alloc_buffer((d,), "float32")
                part = T.sblock_alloc_buffer((16,), "float32")
                score = T.sblock_alloc_buffer((blk,), "float32")
                stat = T.sblock_alloc_buffer((4,), "float32")  # max, sum, block max, rescale
                r: T.int64 = task // h_q
                h: T.int64 = task % h_q
                pos: T.int32 = length[0] + T.Cast("int32", r)
                lo: T.int32 = T.max(pos - span, 0)
                count: T.int32 = pos + 1 - lo
                kvh: T.int64 = h // group
                for e in T.vectorized(d):
                    qf[e] = T.Cast("float32", q[0, r, h, e]) * T.float32(sm_scale)
                    acc[e] = T.float32(0)
                stat[0] = T.float32(-3.0e38)
                stat[1] = T.float32(0)
                for b in range((count + blk - 1) // blk):
                    stat[2] = stat[0]
                    for t in range(T.min(blk, count - b * blk)):
                        for ln in T.vectorized(16):  # q.k: 16 partial sums, then a tree
                            part[ln] = T.float32(0)
                        for c in range(d // 16):
                            for ln in T.vectorized(16):
                                part[ln] = part[ln] + qf[c * 16 + ln] * T.Cast(
                                    "float32", storage[layer, 0, kvh,
                                                       T.truncmod(lo + b * blk + t, cap),
                                                       c * 16 + ln])
                        for e in range(d % 16):
                            part[0] = part[0] + qf[d // 16 * 16 + e] * T.Cast(
                                "float32", storage[layer, 0, kvh,
                                                   T.truncmod(lo + b * blk + t, cap),
                                                   d // 16 * 16 + e])
                        for ln in T.vectorized(8):
                            part[ln] = part[ln] + part[ln + 8]
                        for ln in T.vectorized(4):
                            part[ln] = part[ln] + part[ln + 4]
                        for ln in T.vectorized(2):
                            part[ln] = part[ln] + part[ln + 2]
                        score[t] = part[0] + part[1]
                        stat[2] = T.max(stat[2], score[t])
                    stat[3] = T.exp(stat[0] - stat[2])
                    stat[1] = stat[1] * stat[3]
                    for e in T.vectorized(d):
                        acc[e] = acc[e] * stat[3]
                    stat[0] = stat[2]
                    for t in range(T.min(blk, count - b * blk)):
                        score[t] = T.exp(score[t] - stat[0])
                        stat[1] = stat[1] + score[t]
                        for e in T.vectorized(d):
                            acc[e] = acc[e] + score[t] * T.Cast("float32", storage[
                                layer, 1, kvh, T.truncmod(lo + b * blk + t, cap), e])
                for e in T.vectorized(d):
                    out[0, r, h, e] = T.Cast(dtype, acc[e] / stat[1])

    return func


@functools.cache
def argmax_advance_cpu(vocab: int) -> tirx.PrimFunc:
    """The decode step's greedy token (first index of the largest), and the length + 1."""
    @T.prim_func(private=True, s_tir=True)
    def func(x: T.Buffer((1, 1, vocab), "float32"), length: T.Buffer((1,), "int32"),
             out: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.is_scheduled": True})
        best = T.alloc_buffer((1,), "float32")
        out[0] = 0
        best[0] = x[0, 0, 0]
        for i in range(1, vocab):
            if x[0, 0, i] > best[0]:
                best[0] = x[0, 0, i]
                out[0] = i
        length[0] = length[0] + 1

    return func


def argmax_advance(logits: Tensor, state: KVState) -> Tensor:
    """The greedy token of a decode step's logits [1, 1, vocab]; the cache's length + 1."""
    vocab = logits.shape[-1]
    func = argmax_advance_cuda(vocab) if on_cuda() else argmax_advance_cpu(vocab)
    return op.tensor_ir_op(func, "argmax_advance", args=[logits, state.length],
                           out=Tensor.placeholder((1,), "int32"))
