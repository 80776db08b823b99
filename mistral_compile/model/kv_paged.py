"""The paged KV cache of a batch: page pools per window group, the step's tables, its kernels.

A batched step (``MistralForCausalLM.batch_step``) runs T tokens of several sequences at once,
ragged: decode rows and prefill chunks side by side. Each token brings its absolute position
and its row (the sequence's index in the step's page tables). Layers with the same window form
a group (kv_groups); each group has a pool of pages, one function argument

* ``pool`` [pages, layers in the group, 2 (k, v), H_kv, PAGE_SIZE, D]: key at position p of a
  sequence sits in page ``table[row, (p // PAGE_SIZE) % width]``, slot ``p % PAGE_SIZE``, rotated
  (RoPE at p) when written;
* ``table`` [rows, width] int32: the sequence's pages. Without a window ``width`` covers the
  context; with one it is a ring (ring_width) that holds the pages the window and the next chunk
  need, and the host (runtime/kv_cache.py) puts a fresh page in a slot once the window passed
  the page it held. The host owns every page decision; the kernels only read the tables.

Attention is exact: the query at position p sees keys [p - W + 1, p] (or [0, p]) of its own
sequence, as Hugging Face. The kernels run the rows in parallel, so a step's rows may belong to
any sequences in any order; each sequence's rows of a step are consecutive positions.

StreamingLLM sinks (a windowed model): ``sinks`` [rows, SINK_COLUMNS] int32 holds each table
row's sink count s (0: none, the exact window above), the page that holds its first PAGE_SIZE
positions (kept when the window passes it) and its step's shift = max(0, chunk start - (W - 1)).
An engine without sinks sends [rows, 1] zeros, and the CUDA step then runs the kernel built
without the sink branch (the width is known on the host). The query
at p then sees the s sink keys j < s and the recent keys p - j < W - s, with positions as the
float64 reference (tests/reference.py::streaming_logits) gives them: recent keys and the query
shifted alike, so their scores are those of the stored (absolutely rotated) keys; a sink key
keeps position j, so the query scores it rotated back by the shift.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T

from mistral_compile import abi
from mistral_compile.abi import PAGE_SIZE, SINK_COLUMNS, KVGroup
from mistral_compile.config import MistralConfig
from mistral_compile.model.cpu_kernels import KEY_BLOCK
from mistral_compile.model.kernels import CTYPES, MAX_SPLITS, on_cuda


def kv_groups(config: MistralConfig) -> list[KVGroup]:
    """The window groups of a model (abi.kv_groups of its per-layer windows)."""
    return abi.kv_groups(config.layer_sliding_window_sizes)


TARGET_CTAS = 1056  # split-KV CTAs a step aims for: 8 per SM of an H200 (132 SMs)


def _splits(rows: tirx.PrimExpr, h_kv: int) -> tirx.PrimExpr:
    """CTAs that share one row's keys for one KV head in mc::paged_attn_partial."""
    return T.min(MAX_SPLITS, T.max(1, T.ceildiv(TARGET_CTAS, rows * h_kv)))


def _pool_shape(layers: int, h_kv: int, d: int, pages: tirx.Var) -> tuple:
    return (pages, layers, 2, h_kv, PAGE_SIZE, d)


class PagedCache:
    """Stands where the owned cache stands in the layers (``attention_with_fused_qkv``).

    Holds the step's positions, rows, and each group's table and pool (relax tensors).
    """

    def __init__(self, config: MistralConfig, positions: Tensor, rows: Tensor, sinks: Tensor,
                 tables: list[Tensor], pools: list[Tensor]) -> None:
        self.config, self.positions, self.rows, self.sinks = config, positions, rows, sinks
        self.groups = kv_groups(config)
        self.tables, self.pools = list(tables), list(pools)
        self.where = {}  # layer -> (group, index in the group)
        for g, group in enumerate(self.groups):
            for i, layer in enumerate(group.layers):
                self.where[layer] = (g, i)

    def attention_with_fused_qkv(self, layer_id: int, qkv: Tensor, num_qo_heads: int,
                                 sm_scale: float) -> Tensor:
        """Append the rows' keys and values to their pages and attend: [1, T, H_q, D]."""
        cfg = self.config
        _, n, _, d = qkv.shape
        dtype = qkv.dtype
        g, index = self.where[layer_id]
        group = self.groups[g]
        shape = dict(layers=len(group.layers), h_q=num_qo_heads, h_kv=cfg.num_key_value_heads,
                     d=d, dtype=dtype)
        layer = tirx.IntImm("int32", index)
        theta = float(cfg.position_embedding_base)
        table, pool = self.tables[g], self.pools[g]
        steps = [self.positions, self.rows, table, pool, layer]
        append = append_cuda if on_cuda() else append_cpu
        q = op.tensor_ir_op(append(**shape, theta=theta), "paged_append", args=[qkv, *steps],
                            out=Tensor.placeholder((1, n, num_qo_heads, d), dtype))
        attend = attention_cuda if on_cuda() else attention_cpu
        return op.tensor_ir_op(attend(**shape, window=group.window, sm_scale=sm_scale,
                                      theta=theta),
                               "paged_attention",
                               args=[q, self.positions, self.rows, self.sinks, table, pool, layer],
                               out=Tensor.placeholder((1, n, num_qo_heads, d), dtype))


# ---- CPU: plain loops (tests and CPU builds) ----

@functools.cache
def append_cpu(layers: int, h_q: int, h_kv: int, d: int, dtype: str,
               theta: float) -> tirx.PrimFunc:
    """Rotated q out; rotated k and v into their pages (float32 arithmetic), rows in parallel."""
    heads, half = h_q + 2 * h_kv, d // 2

    @T.prim_func(private=True, s_tir=True)
    def func(qkv_handle: T.handle, pos_handle: T.handle, row_handle: T.handle,
             table_handle: T.handle, pool_handle: T.handle, layer: T.int32, q_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n, b, w, pages = T.int64(), T.int64(), T.int64(), T.int64()
        qkv = T.match_buffer(qkv_handle, (1, n, heads, d), dtype)
        positions = T.match_buffer(pos_handle, (n,), "int32")
        rows = T.match_buffer(row_handle, (n,), "int32")
        table = T.match_buffer(table_handle, (b, w), "int32")
        pool = T.match_buffer(pool_handle, _pool_shape(layers, h_kv, d, pages), dtype)
        q = T.match_buffer(q_handle, (1, n, h_q, d), dtype)
        with T.sblock("root"):
            for r in T.parallel(n):
                cs = T.sblock_alloc_buffer((2, half), "float32")
                pos: T.int32 = positions[r]
                page: T.int32 = table[rows[r], T.truncmod(T.truncdiv(pos, PAGE_SIZE),
                                                          T.Cast("int32", w))]
                slot: T.int32 = T.truncmod(pos, PAGE_SIZE)
                for j in range(half):
                    angle: T.float32 = T.Cast("float32", pos) / T.pow(
                        T.float32(theta), T.Cast("float32", 2 * j) / T.float32(d))
                    cs[0, j] = T.cos(angle)
                    cs[1, j] = T.sin(angle)
                for h, j in T.grid(heads, half):
                    a: T.float32 = T.Cast("float32", qkv[0, r, h, j])
                    c: T.float32 = T.Cast("float32", qkv[0, r, h, j + half])
                    lo: T.float32 = a * cs[0, j] - c * cs[1, j]
                    hi: T.float32 = c * cs[0, j] + a * cs[1, j]
                    if h < h_q:
                        q[0, r, h, j] = T.Cast(dtype, lo)
                        q[0, r, h, j + half] = T.Cast(dtype, hi)
                    elif h < h_q + h_kv:
                        pool[page, layer, 0, h - h_q, slot, j] = T.Cast(dtype, lo)
                        pool[page, layer, 0, h - h_q, slot, j + half] = T.Cast(dtype, hi)
                    else:
                        pool[page, layer, 1, h - h_q - h_kv, slot, j] = qkv[0, r, h, j]
                        pool[page, layer, 1, h - h_q - h_kv, slot, j + half] = \
                            qkv[0, r, h, j + half]

    return func


@functools.cache
def attention_cpu(layers: int, h_q: int, h_kv: int, d: int, dtype: str, window: int,
                  sm_scale: float, theta: float) -> tirx.PrimFunc:
    """Attention of appended rows through the page tables, one (row, head) per task, float32.

    The online softmax of kv_owned.attention_cpu: keys scored in blocks of KEY_BLOCK. A row
    with sinks (module docstring) sees its ``nsink`` sink keys first, scored with q rotated
    back by the shift, then the recent keys from ``lo``.
    """
    group = h_q // h_kv
    span = window - 1 if window > 0 else 1 << 30  # a row sees keys [pos - span, pos]
    blk = KEY_BLOCK
    half = d // 2

    @T.prim_func(private=True, s_tir=True)
    def func(q_handle: T.handle, pos_handle: T.handle, row_handle: T.handle,
             sink_handle: T.handle, table_handle: T.handle, pool_handle: T.handle,
             layer: T.int32, out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n, b, w, pages = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_handle, (1, n, h_q, d), dtype)
        positions = T.match_buffer(pos_handle, (n,), "int32")
        rows = T.match_buffer(row_handle, (n,), "int32")
        cols = T.int64()
        sinks = T.match_buffer(sink_handle, (b, cols), "int32")
        table = T.match_buffer(table_handle, (b, w), "int32")
        pool = T.match_buffer(pool_handle, _pool_shape(layers, h_kv, d, pages), dtype)
        out = T.match_buffer(out_handle, (1, n, h_q, d), dtype)
        with T.sblock("root"):
            for task in T.parallel(n * h_q):
                qf = T.sblock_alloc_buffer((d,), "float32")
                qs = T.sblock_alloc_buffer((d,), "float32")  # q rotated back by the shift
                acc = T.sblock_alloc_buffer((d,), "float32")
                part = T.sblock_alloc_buffer((16,), "float32")
                score = T.sblock_alloc_buffer((blk,), "float32")
                where = T.sblock_alloc_buffer((blk, 3), "int32")  # page, slot, is a sink key
                stat = T.sblock_alloc_buffer((4,), "float32")  # max, sum, block max, rescale
                r: T.int64 = task // h_q
                h: T.int64 = task % h_q
                pos: T.int32 = positions[r]
                seq: T.int32 = rows[r]
                sink: T.int32 = T.if_then_else(cols == SINK_COLUMNS, sinks[seq, 0], 0)
                nsink: T.int32 = T.min(sink, pos + 1)  # sink keys this query sees
                lo: T.int32 = T.if_then_else(sink > 0, T.max(sink, pos - (window - sink) + 1),
                                             T.max(pos - span, 0))
                count: T.int32 = nsink + T.max(pos + 1 - lo, 0)
                kvh: T.int64 = h // group
                for e in T.vectorized(d):
                    qf[e] = T.Cast("float32", q[0, r, h, e]) * T.float32(sm_scale)
                    acc[e] = T.float32(0)
                if sink > 0:
                    for j in range(half):  # R(-shift) q: rotate-half with the angle negated
                        angle: T.float32 = T.Cast("float32", sinks[seq, 2]) / T.pow(
                            T.float32(theta), T.Cast("float32", 2 * j) / T.float32(d))
                        qs[j] = qf[j] * T.cos(angle) + qf[j + half] * T.sin(angle)
                        qs[j + half] = qf[j + half] * T.cos(angle) - qf[j] * T.sin(angle)
                stat[0] = T.float32(-3.0e38)
                stat[1] = T.float32(0)
                for kb in range((count + blk - 1) // blk):
                    stat[2] = stat[0]
                    for t in range(T.min(blk, count - kb * blk)):
                        # key kb * blk + t: the sinks first, then the recent keys from lo
                        where[t, 2] = T.if_then_else(kb * blk + t < nsink, 1, 0)
                        where[t, 0] = T.if_then_else(
                            where[t, 2] == 1, sinks[seq, 1],
                            table[seq, T.truncmod(T.truncdiv(lo + kb * blk + t - nsink,
                                                             PAGE_SIZE), T.Cast("int32", w))])
                        where[t, 1] = T.if_then_else(
                            where[t, 2] == 1, kb * blk + t,
                            T.truncmod(lo + kb * blk + t - nsink, PAGE_SIZE))
                        for ln in T.vectorized(16):  # q.k: 16 partial sums, then a tree
                            part[ln] = T.float32(0)
                        for c in range(d // 16):
                            for ln in T.vectorized(16):
                                part[ln] = part[ln] + T.if_then_else(
                                    where[t, 2] == 1, qs[c * 16 + ln], qf[c * 16 + ln]
                                ) * T.Cast("float32", pool[where[t, 0], layer, 0, kvh,
                                                          where[t, 1], c * 16 + ln])
                        for e in range(d % 16):
                            part[0] = part[0] + T.if_then_else(
                                where[t, 2] == 1, qs[d // 16 * 16 + e], qf[d // 16 * 16 + e]
                            ) * T.Cast("float32", pool[where[t, 0], layer, 0, kvh, where[t, 1],
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
                    for t in range(T.min(blk, count - kb * blk)):
                        score[t] = T.exp(score[t] - stat[0])
                        stat[1] = stat[1] + score[t]
                        for e in T.vectorized(d):
                            acc[e] = acc[e] + score[t] * T.Cast(
                                "float32", pool[where[t, 0], layer, 1, kvh, where[t, 1], e])
                for e in T.vectorized(d):
                    out[0, r, h, e] = T.Cast(dtype, acc[e] / stat[1])

    return func


# ---- CUDA: launch stubs for mc::paged_* (compiler/csrc/mc_kernels.cuh) ----

@functools.cache
def append_cuda(layers: int, h_q: int, h_kv: int, d: int, dtype: str,
                theta: float) -> tirx.PrimFunc:
    """Rotated q out; rotated k and v into their pages (mc::paged_append)."""
    heads = h_q + 2 * h_kv
    extern = f"mc::paged_append<{CTYPES[dtype]}, {d}, {h_q}, {h_kv}, {PAGE_SIZE}>"

    @T.prim_func(private=True, s_tir=True)
    def func(qkv_handle: T.handle, pos_handle: T.handle, row_handle: T.handle,
             table_handle: T.handle, pool_handle: T.handle, layer: T.int32, q_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n, b, w, pages = T.int64(), T.int64(), T.int64(), T.int64()
        qkv = T.match_buffer(qkv_handle, (1, n, heads, d), dtype)
        positions = T.match_buffer(pos_handle, (n,), "int32")
        rows = T.match_buffer(row_handle, (n,), "int32")
        table = T.match_buffer(table_handle, (b, w), "int32")
        pool = T.match_buffer(pool_handle, _pool_shape(layers, h_kv, d, pages), dtype)
        q = T.match_buffer(q_handle, (1, n, h_q, d), dtype)
        for _bx in T.thread_binding(T.max(1, T.ceildiv(n * heads * (d // 16), 256)),
                                    thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("append"):
                    T.reads(qkv[0, 0:n, 0:heads, 0:d], positions[0:n], rows[0:n],
                            table[0:b, 0:w])
                    T.writes(q[0, 0:n, 0:h_q, 0:d])
                    T.evaluate(T.call_extern(
                        "void", extern, qkv.access_ptr("r"), positions.access_ptr("r"),
                        rows.access_ptr("r"), T.Cast("int32", n), table.access_ptr("r"),
                        T.Cast("int32", w), pool.access_ptr("rw"), layer, layers,
                        q.access_ptr("w"), T.float32(theta)))

    return func


@functools.cache
def attention_cuda(layers: int, h_q: int, h_kv: int, d: int, dtype: str, window: int,
                   sm_scale: float, theta: float) -> tirx.PrimFunc:
    """Split-KV attention of appended rows through the page tables, then the merge.

    mc::paged_attn_partial splits each (row, KV head)'s recent keys over ``nsplit`` CTAs, chosen
    from the row count so that a small batch still fills the GPU (split 0 also scores the sink
    keys); mc::paged_merge merges them.
    """
    group = h_q // h_kv
    kernel = f"mc::paged_attn_partial<{CTYPES[dtype]}, {d}, {group}, {h_kv}, {PAGE_SIZE}"
    partial, partial_sinks = kernel + ", false>", kernel + ", true>"
    merge = f"mc::paged_merge<{CTYPES[dtype]}, {d}>"

    @T.macro
    def launch_partial(extern, q, positions, rows, sinks, table, pool, layer, ws, n, b, w):  # noqa: ANN001, ANN202
        for _bx in T.thread_binding(_splits(n, h_kv), thread="blockIdx.x"):
            for _by in T.thread_binding(h_kv, thread="blockIdx.y"):
                for _bz in T.thread_binding(n, thread="blockIdx.z"):
                    for _tx in T.thread_binding(128, thread="threadIdx.x"):
                        with T.sblock("partial"):
                            T.reads(q[0, 0:n, 0:h_q, 0:d], positions[0:n], rows[0:n],
                                    sinks[0:b, 0:sinks.shape[1]], table[0:b, 0:w])
                            T.writes(ws[0:n * h_q * _splits(n, h_kv) * (d + 2)])
                            T.evaluate(T.call_extern(
                                "void", extern, q.access_ptr("r"), positions.access_ptr("r"),
                                rows.access_ptr("r"), sinks.access_ptr("r"),
                                table.access_ptr("r"), T.Cast("int32", w), pool.access_ptr("r"),
                                layer, layers, window, ws.access_ptr("rw"),
                                T.Cast("int32", _splits(n, h_kv)), T.float32(sm_scale),
                                T.float32(theta)))

    @T.prim_func(private=True, s_tir=True)
    def func(q_handle: T.handle, pos_handle: T.handle, row_handle: T.handle,
             sink_handle: T.handle, table_handle: T.handle, pool_handle: T.handle,
             layer: T.int32, out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n, b, w, pages, cols = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_handle, (1, n, h_q, d), dtype)
        positions = T.match_buffer(pos_handle, (n,), "int32")
        rows = T.match_buffer(row_handle, (n,), "int32")
        sinks = T.match_buffer(sink_handle, (b, cols), "int32")
        table = T.match_buffer(table_handle, (b, w), "int32")
        pool = T.match_buffer(pool_handle, _pool_shape(layers, h_kv, d, pages), dtype)
        out = T.match_buffer(out_handle, (1, n, h_q, d), dtype)
        ws = T.alloc_buffer((n * h_q * _splits(n, h_kv) * (d + 2),), "float32")
        if cols == SINK_COLUMNS:  # the host knows the width: the sink branch only when sent
            launch_partial(partial_sinks, q, positions, rows, sinks, table, pool, layer, ws, n,
                           b, w)
        else:
            launch_partial(partial, q, positions, rows, sinks, table, pool, layer, ws, n, b, w)
        for _hx in T.thread_binding(h_q, thread="blockIdx.x"):
            for _by in T.thread_binding(n, thread="blockIdx.y"):
                for _tx in T.thread_binding(d, thread="threadIdx.x"):
                    with T.sblock("merge"):
                        T.reads(ws[0:n * h_q * _splits(n, h_kv) * (d + 2)])
                        T.writes(out[0, 0:n, 0:h_q, 0:d])
                        T.evaluate(T.call_extern(
                            "void", merge, ws.access_ptr("r"), T.Cast("int32", n),
                            T.Cast("int32", _splits(n, h_kv)), out.access_ptr("w")))

    return func
