"""TIR launch stubs for our hand-written CUDA kernels (compiler/csrc/mc_kernels.cuh)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from tvm import tirx
from tvm.relax.frontend.nn.llm import _prefill_kernels, kv_cache
from tvm.script import tirx as T
from tvm.target import Target

CTYPES = {"float16": "half", "float32": "float"}
VEC = {"float16": 8, "float32": 4}  # elements per 16-byte load
THREADS = 128
TARGET_CTAS = 256  # enough CTAs to fill an H100's 132 SMs twice at batch 1
MAX_SPLITS = 64


def split_count(batch: tirx.PrimExpr, num_kv_heads: int) -> tirx.PrimExpr:
    """How many CTAs share one sequence's KV rows for one KV head."""
    return T.min(MAX_SPLITS, T.max(1, T.ceildiv(TARGET_CTAS, batch * num_kv_heads)))


def decode_attention_supported(num_kv_heads: int, num_qo_heads: int, head_dim: int,
                               dtype: str) -> bool:
    """Whether the split-KV decode kernel handles this shape (else TVM's own kernel is used)."""
    if dtype not in CTYPES or num_qo_heads % num_kv_heads:
        return False
    lanes = head_dim // VEC[dtype]
    if head_dim % VEC[dtype] or lanes < 2 or lanes > 32 or 32 % lanes:
        return False
    groups = (THREADS // 32) * (32 // lanes)
    group = num_qo_heads // num_kv_heads
    return groups * group * (head_dim + 2) * 4 <= 40 * 1024  # static shared memory


def decode_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str,
                     sliding_window: bool, page_size: int = 16) -> tirx.PrimFunc:
    """Paged-KV decode attention with the signature of TVM's ``_attention_decode``.

    Two launches: pass 1 splits each sequence's KV rows over ``nsplit`` CTAs per KV head (so a
    batch-1 decode keeps every SM busy), pass 2 merges the splits. RoPE is applied inline when
    the cache asks for it (``rotary_mode == 1``, TVM's per-sequence sliding window).
    """
    h_qo, h_kv, d = num_qo_heads, num_kv_heads, head_dim
    group = h_qo // h_kv
    ctype = CTYPES[dtype]
    partial = (f"mc::decode_attn_partial<{ctype}, {d}, {group}, {page_size}, "
               f"{'true' if sliding_window else 'false'}>")
    merge = f"mc::decode_attn_merge<{ctype}, {d}>"
    symbol = "mc_batch_decode_paged_kv" + ("_sliding_window" if sliding_window else "")
    info_shape = (3,) if sliding_window else ()

    @T.prim_func(s_tir=True)
    def decode(q_handle: T.handle, pages_handle: T.handle, indptr_handle: T.handle,
               values_handle: T.handle, length_info_handle: T.handle, k_rope_handle: T.handle,
               q_rope_handle: T.handle, output_handle: T.handle, lse_handle: T.handle,
               rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
               sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": symbol})
        B = T.int32()
        nnz_pages = T.int32()
        max_pages = T.int32()
        pages_off = T.int64()
        indptr_off = T.int32()
        values_off = T.int32()
        k_rope_off = T.int32()
        q_rope_off = T.int32()
        info_off = T.int32()
        Q = T.match_buffer(q_handle, (B, h_qo, d), dtype)
        pages = T.match_buffer(pages_handle, (max_pages, 2, h_kv, page_size, d), dtype,
                               elem_offset=pages_off)
        indptr = T.match_buffer(indptr_handle, (B + 1,), "int32", elem_offset=indptr_off)
        values = T.match_buffer(values_handle, (nnz_pages,), "int32", elem_offset=values_off)
        length_info = T.match_buffer(length_info_handle, info_shape + (B,), "int32",
                                     elem_offset=info_off)
        k_rope = T.match_buffer(k_rope_handle, (B,), "int32", elem_offset=k_rope_off)
        q_rope = T.match_buffer(q_rope_handle, (B,), "int32", elem_offset=q_rope_off)
        output = T.match_buffer(output_handle, (B, h_qo, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_qo), "float32")
        ws = T.alloc_buffer((B * h_qo * split_count(B, h_kv) * (d + 2),), "float32")
        # ws is passed as access_ptr (whole extent): with address_of(ws[0]) TVM's
        # CompactBufferAllocation shrank it to one element and the kernels wrote past it
        for _bx in T.thread_binding(split_count(B, h_kv), thread="blockIdx.x"):
            for _by in T.thread_binding(h_kv, thread="blockIdx.y"):
                for _bz in T.thread_binding(B, thread="blockIdx.z"):
                    for _tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                        with T.sblock("partial"):
                            T.reads()
                            T.writes(ws[0:B * h_qo * split_count(B, h_kv) * (d + 2)])
                            T.evaluate(T.call_extern(
                                "void", partial, T.address_of(Q[0, 0, 0]),
                                T.address_of(pages[0, 0, 0, 0, 0]), T.address_of(indptr[0]),
                                T.address_of(values[0]), length_info.access_ptr("r"), B,
                                T.address_of(k_rope[0]), T.address_of(q_rope[0]),
                                ws.access_ptr("rw"),
                                split_count(B, h_kv), rotary_mode, rope_scale,
                                rope_theta, sm_scale))
        for _hx in T.thread_binding(h_qo, thread="blockIdx.x"):
            for _by in T.thread_binding(B, thread="blockIdx.y"):
                for _tx in T.thread_binding(d, thread="threadIdx.x"):
                    with T.sblock("merge"):
                        T.reads(ws[0:B * h_qo * split_count(B, h_kv) * (d + 2)])
                        T.writes()
                        T.evaluate(T.call_extern(
                            "void", merge, ws.access_ptr("rw"), B,
                            split_count(B, h_kv),
                            T.address_of(output[0, 0, 0]), T.address_of(lse[0, 0])))

    return decode


FA_ROWS = 64  # query rows per CTA of the flash-attention prefill kernel (FA_BR in the header)
FA_THREADS = 128


def prefill_ragged_supported(num_kv_heads: int, num_qo_heads: int, d_qk: int, d_v: int,
                             dtype: str) -> bool:
    """Whether the tensor-core prefill kernel handles this shape (else TVM's own kernel)."""
    return (dtype == "float16" and d_qk == d_v and d_qk % 16 == 0 and 16 <= d_qk <= 128
            and num_qo_heads % num_kv_heads == 0)


def prefill_ragged_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int,
                             dtype: str) -> tirx.PrimFunc:
    """Flash-attention prefill with the signature of TVM's ``batch_prefill_ragged_kv``.

    Two launches: with inline RoPE (``rotary_mode == 1``) the keys are first rotated once into
    a workspace; then one CTA per (64 query rows, query head) runs the tensor-core kernel.
    """
    h_qo, h_kv, d = num_qo_heads, num_kv_heads, head_dim
    attn = f"mc::prefill_attn_ragged<{d}, {h_qo // h_kv}>"
    rope = f"mc::rope_ragged_keys<{d}>"

    @T.prim_func(s_tir=True)
    def prefill(q_handle: T.handle, q_indptr_handle: T.handle, k_handle: T.handle,
                v_handle: T.handle, kv_indptr_handle: T.handle, q_rope_handle: T.handle,
                k_rope_handle: T.handle, output_handle: T.handle, lse_handle: T.handle,
                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "mc_batch_prefill_ragged_kv"})
        B = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_off = T.int32()
        kv_indptr_off = T.int32()
        q_rope_off = T.int32()
        k_rope_off = T.int32()
        q = T.match_buffer(q_handle, (qo_len, h_qo, d), dtype)
        q_indptr = T.match_buffer(q_indptr_handle, (B + 1,), "int32", elem_offset=q_indptr_off)
        k = T.match_buffer(k_handle, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(v_handle, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(kv_indptr_handle, (B + 1,), "int32",
                                   elem_offset=kv_indptr_off)
        q_rope = T.match_buffer(q_rope_handle, (qo_len,), "int32", elem_offset=q_rope_off)
        k_rope = T.match_buffer(k_rope_handle, (B,), "int32", elem_offset=k_rope_off)
        output = T.match_buffer(output_handle, (qo_len, h_qo, d), dtype)
        lse = T.match_buffer(lse_handle, (qo_len, h_qo), "float32")
        k_rot = T.alloc_buffer((kv_len * h_kv * d,), dtype)
        for _bx in T.thread_binding(  # one CTA, which returns at once, without inline RoPE
                T.if_then_else(rotary_mode == 1,
                               T.max(1, T.ceildiv(kv_len * h_kv * (d // 16), 256)), 1),
                thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("rope_keys"):
                    T.reads()
                    T.writes(k_rot[0:kv_len * h_kv * d])
                    T.evaluate(T.call_extern(
                        "void", rope, k.access_ptr("r"), T.address_of(kv_indptr[0]),
                        T.address_of(k_rope[0]), B, kv_len, h_kv, k_rot.access_ptr("w"),
                        rotary_mode, rope_scale, rope_theta))
        for _bx in T.thread_binding(T.ceildiv(qo_len, FA_ROWS) + B, thread="blockIdx.x"):
            for _by in T.thread_binding(h_qo, thread="blockIdx.y"):
                for _tx in T.thread_binding(FA_THREADS, thread="threadIdx.x"):
                    with T.sblock("attention"):
                        T.reads(k_rot[0:kv_len * h_kv * d])
                        T.writes()
                        T.evaluate(T.call_extern(
                            "void", attn, q.access_ptr("r"), T.address_of(q_indptr[0]),
                            k.access_ptr("r"), k_rot.access_ptr("r"), v.access_ptr("r"),
                            T.address_of(kv_indptr[0]), T.address_of(q_rope[0]),
                            output.access_ptr("w"), lse.access_ptr("w"), B, causal,
                            rotary_mode, rope_scale, rope_theta, sm_scale))

    return prefill


def split_rotary(theta: float, scale: float, head_dim: int, num_q_heads: int,
                 num_kv_heads: int, dtype: str) -> tirx.PrimFunc:
    """TVM's ``tir_split_rotary`` (same signature): split the fused q/k/v and rotate q and k.

    One thread per 8 low-half elements of a (row, head) and their rotate-half partners. TVM's
    generated kernel took 150 us per 7B layer at 4096 tokens (4.8 ms of a prefill).
    """
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim
    heads = hq + 2 * hkv
    extern = f"mc::split_rope<{CTYPES[dtype]}, {d}, {hq}, {hkv}>"

    @T.prim_func(s_tir=True)
    def split(qkv_handle: T.handle, pos_handle: T.handle, q_handle: T.handle,
              k_handle: T.handle, v_handle: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True, "tirx.noalias": True})
        rows = T.int32()
        pos_off = T.int32()
        qkv = T.match_buffer(qkv_handle, (rows, heads, d), dtype)
        pos = T.match_buffer(pos_handle, (rows,), "int32", elem_offset=pos_off)
        q = T.match_buffer(q_handle, (rows, hq, d), dtype)
        k = T.match_buffer(k_handle, (rows, hkv, d), dtype)
        v = T.match_buffer(v_handle, (rows, hkv, d), dtype)
        for _bx in T.thread_binding(T.max(1, T.ceildiv(rows * heads * (d // 16), 256)),
                                    thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("split_rope"):
                    T.reads(qkv[0:rows, 0:heads, 0:d], pos[0:rows])
                    T.writes(q[0:rows, 0:hq, 0:d], k[0:rows, 0:hkv, 0:d], v[0:rows, 0:hkv, 0:d])
                    T.evaluate(T.call_extern(
                        "void", extern, qkv.access_ptr("r"), T.address_of(pos[0]),
                        q.access_ptr("w"), k.access_ptr("w"), v.access_ptr("w"), rows,
                        T.Cast("int32", apply_rope), T.float32(scale), T.float32(theta)))

    return split


PREFILL_BLOCKS = 128  # CTAs per KV head for TVM's prefill attention kernels (TVM uses 16)


@contextlib.contextmanager
def own_attention_kernels() -> Iterator[None]:
    """While the block runs, TVM's paged KV cache generates CUDA kernels our way.

    Decode attention, the ragged (new tokens against themselves) prefill attention and the
    split + RoPE of the fused projection are ours, with TVM's signatures; TVM's paged prefill
    kernel (new tokens against cached pages) launches PREFILL_BLOCKS CTAs per KV head. TVM's
    prefill attention walks its query tiles with 16 persistent CTAs per KV head: 128 CTAs of 4
    warps for Mistral-7B, one per SM, which left a 4096-token prefill 85% in attention.
    """
    original = kv_cache._attention_decode
    original_ragged = kv_cache._attention_prefill_ragged
    original_config = _prefill_kernels._get_prefill_kernel_config
    original_rope = kv_cache.llama_rope_with_position_map

    def choose(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str,
               sliding_window: bool, rope_scaling: dict[str, Any], target: Target,
               page_size: int = 16) -> tirx.PrimFunc:
        if (target.kind.name == "cuda" and not rope_scaling
                and decode_attention_supported(num_kv_heads, num_qo_heads, head_dim, dtype)):
            return decode_attention(num_kv_heads, num_qo_heads, head_dim, dtype, sliding_window,
                                    page_size)
        return original(num_kv_heads, num_qo_heads, head_dim, dtype, sliding_window,
                        rope_scaling, target, page_size)

    def ragged(h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str,
               rope_scaling: dict[str, Any], target: Target) -> tirx.PrimFunc:
        if (target.kind.name == "cuda" and not rope_scaling
                and prefill_ragged_supported(h_kv, h_q, d_qk, d_v, dtype)):
            return prefill_ragged_attention(h_kv, h_q, d_qk, dtype)
        return original_ragged(h_kv, h_q, d_qk, d_v, dtype, rope_scaling, target)

    def config(h_kv: int, h_q: int, d: int, dtype: str, target: Target,
               **kw: Any) -> tuple:
        blocks, *rest = original_config(h_kv, h_q, d, dtype, target, **kw)
        return (max(blocks, PREFILL_BLOCKS) if target.kind.name == "cuda" else blocks, *rest)

    def rope(theta: float, scale: float, head_dim: int, num_q_heads: int, num_kv_heads: int,
             dtype: str, rope_scaling: dict[str, Any], rotary_dim: int | None = None) -> Any:
        target = Target.current(allow_none=True)
        if (target is not None and target.kind.name == "cuda" and not rope_scaling
                and rotary_dim in (None, head_dim) and head_dim % 16 == 0 and dtype in CTYPES):
            return split_rotary(theta, scale, head_dim, num_q_heads, num_kv_heads, dtype)
        return original_rope(theta, scale, head_dim, num_q_heads, num_kv_heads, dtype,
                             rope_scaling, rotary_dim)

    kv_cache._attention_decode = choose
    kv_cache._attention_prefill_ragged = ragged
    _prefill_kernels._get_prefill_kernel_config = config
    kv_cache.llama_rope_with_position_map = rope
    try:
        yield
    finally:
        kv_cache._attention_decode = original
        kv_cache._attention_prefill_ragged = original_ragged
        _prefill_kernels._get_prefill_kernel_config = original_config
        kv_cache.llama_rope_with_position_map = original_rope


GEMV_WARPS = 8  # warps per CTA (each walks output rows)
# q4 GEMVs: beyond this many CTAs, warps take several rows, so x (staged once per CTA) is
# reused over more weight bytes. Measured on the H100 at batch-1 decode (7B, 1k context):
# 3.28 ms at 512 and 3.27 at 264, 3.55 with one row per warp, 4.29 at 132. The float16 GEMVs
# read 4x the bytes per row and are fastest with one row per warp (6.46 vs 6.58 ms at 512).
GEMV_Q4_MAX_CTAS = 512
GEMV_MODES = {"plain": 0, "norm": 1, "residual": 2, "norm_silu": 3,  # GEMV_* in the header
              "silu": 4}


_BYTES = {"float16": 2, "float32": 4}
GEMV_STATIC_X_BYTES = 48 * 1024  # mc_kernels.cuh: x beyond this comes in dynamic shared memory
GEMV_MAX_X_BYTES = 96 * 1024  # two CTAs per SM still fit (Mistral-Small-24B's down: 64 KB)


def gemv_supported(in_features: int, dtype: str) -> bool:
    """Whether the decode GEMV handles this input width (x is staged in shared memory)."""
    return dtype in CTYPES and in_features % VEC[dtype] == 0 and \
        in_features * _BYTES[dtype] <= GEMV_MAX_X_BYTES


def gemv_x_elements(in_features: int, dtype: str) -> int:
    """Elements of the GEMV's dynamic shared x (mc::gemv_x_dynamic); 8 when x fits statically."""
    return in_features if in_features * _BYTES[dtype] > GEMV_STATIC_X_BYTES else 8


def gemv_shapes(n: int, k: int, mode: str) -> tuple[tuple[int, ...], int]:
    """A decode GEMV's ``aux`` operand shape and its number of outputs, per fusion mode.

    plain: aux is x again (unused); norm: aux is the RMSNorm weight [k], y = W RMSNorm(x);
    residual: aux is the residual [1, 1, n], y = aux + W x; norm_silu: W is [gate; up]
    (n = 2 * outputs), y = silu(gate RMSNorm(x)) * (up RMSNorm(x)).
    """
    aux = {"plain": (1, 1, k), "norm": (k,), "norm_silu": (k,)}.get(mode, (1, 1, n))
    return aux, n // 2 if mode == "norm_silu" else n


def _gemv_ctas(outputs: int, limit: int | None = None) -> int:
    ctas = (outputs + GEMV_WARPS - 1) // GEMV_WARPS
    return ctas if limit is None else min(ctas, limit)


@functools.cache  # each linear of each exported function asks; parse once
def gemv(out_features: int, in_features: int, dtype: str, out_dtype: str, mode: str = "plain",
         eps: float = 0.0) -> tirx.PrimFunc:
    """y[1, 1, N] = x[1, 1, K] @ W[N, K]^T for batch-1 decode, float32 accumulation.

    ``mode`` fuses the neighbouring small kernels (see gemv_shapes); ``eps`` is the RMSNorm
    epsilon of the norm modes.
    """
    n, k = out_features, in_features
    extern = f"mc::gemv<{CTYPES[dtype]}, {CTYPES[out_dtype]}, {k}, {GEMV_MODES[mode]}>"
    aux_shape, outputs = gemv_shapes(n, k, mode)
    x_elements = gemv_x_elements(k, dtype)

    @T.prim_func(private=True, s_tir=True)
    def func(x: T.Buffer((1, 1, k), dtype), aux: T.Buffer(aux_shape, dtype),
             w: T.Buffer((n, k), dtype), y: T.Buffer((1, 1, outputs), out_dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for _bx in T.thread_binding(_gemv_ctas(outputs), thread="blockIdx.x"):
            for _tx in T.thread_binding(GEMV_WARPS * 32, thread="threadIdx.x"):
                with T.sblock("gemv"):
                    T.reads(x[0, 0, 0:k], w[0:n, 0:k])
                    T.writes(y[0, 0, 0:outputs])
                    xs = T.alloc_buffer((x_elements,), dtype, scope="shared.dyn")
                    T.evaluate(T.call_extern("void", extern, x.access_ptr("r"),
                                             aux.access_ptr("r"), w.access_ptr("r"),
                                             y.access_ptr("w"), outputs, T.float32(eps),
                                             xs.access_ptr("rw")))

    return func


@functools.cache
def gemv_q4(out_features: int, in_features: int, out_dtype: str, mode: str = "plain",
            eps: float = 0.0, with_min: bool = False) -> tirx.PrimFunc:
    """y[1, 1, N] = x[1, 1, K] @ dequantize(q_weight, q_scale[, q_min])^T at decode.

    gemv's modes; ``with_min``: q4f16_2 (its minimums are the extra ``q_min`` operand).
    """
    n, k = out_features, in_features
    extern = f"mc::gemv_q4<{CTYPES[out_dtype]}, {k}, {GEMV_MODES[mode]}" + (
        ", mc::Q4Dot, mc::SameRow, true>" if with_min else ">")
    aux_shape, outputs = gemv_shapes(n, k, mode)
    ctas = _gemv_ctas(outputs, GEMV_Q4_MAX_CTAS)
    x_elements = gemv_x_elements(k, "float16")

    if not with_min:
        @T.prim_func(private=True, s_tir=True)
        def func(x: T.Buffer((1, 1, k), "float16"), aux: T.Buffer(aux_shape, "float16"),
                 q_weight: T.Buffer((n, k // 8), "uint32"),
                 q_scale: T.Buffer((n, k // 32), "float16"),
                 y: T.Buffer((1, 1, outputs), out_dtype)):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            for _bx in T.thread_binding(ctas, thread="blockIdx.x"):
                for _tx in T.thread_binding(GEMV_WARPS * 32, thread="threadIdx.x"):
                    with T.sblock("gemv_q4"):
                        T.reads(x[0, 0, 0:k], q_weight[0:n, 0:k // 8], q_scale[0:n, 0:k // 32])
                        T.writes(y[0, 0, 0:outputs])
                        xs = T.alloc_buffer((x_elements,), "float16", scope="shared.dyn")
                        T.evaluate(T.call_extern("void", extern, x.access_ptr("r"),
                                                 aux.access_ptr("r"), q_weight.access_ptr("r"),
                                                 q_scale.access_ptr("r"), y.access_ptr("w"),
                                                 outputs, T.float32(eps),
                                                 q_scale.access_ptr("r"),  # no minimums
                                                 xs.access_ptr("rw")))

        return func

    @T.prim_func(private=True, s_tir=True)
    def func_min(x: T.Buffer((1, 1, k), "float16"), aux: T.Buffer(aux_shape, "float16"),
                 q_weight: T.Buffer((n, k // 8), "uint32"),
                 q_scale: T.Buffer((n, k // 32), "float16"),
                 q_min: T.Buffer((n, k // 32), "float16"),
                 y: T.Buffer((1, 1, outputs), out_dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for _bx in T.thread_binding(ctas, thread="blockIdx.x"):
            for _tx in T.thread_binding(GEMV_WARPS * 32, thread="threadIdx.x"):
                with T.sblock("gemv_q4"):
                    T.reads(x[0, 0, 0:k], q_weight[0:n, 0:k // 8], q_scale[0:n, 0:k // 32],
                            q_min[0:n, 0:k // 32])
                    T.writes(y[0, 0, 0:outputs])
                    xs = T.alloc_buffer((x_elements,), "float16", scope="shared.dyn")
                    T.evaluate(T.call_extern("void", extern, x.access_ptr("r"),
                                             aux.access_ptr("r"), q_weight.access_ptr("r"),
                                             q_scale.access_ptr("r"), y.access_ptr("w"),
                                             outputs, T.float32(eps), q_min.access_ptr("r"),
                                             xs.access_ptr("rw")))

    return func_min


@functools.cache
def gemv_experts(out_features: int, in_features: int, experts: int, top_k: int, dtype: str,
                 out_dtype: str, mode: str, shared_x: bool,
                 q4: str | None = None) -> tirx.PrimFunc:
    """The decode GEMVs of a mixture of experts: y[s] = W[idx[s]] x[s] for the top_k slots s.

    W is a stacked expert weight [E, R, K] (R = N, or 2 N with ``mode`` "silu": each expert's
    gate rows, then its up rows), float or ``q4`` ("q4f16_1" / "q4f16_2": codes [E, R, K / 8],
    scales and minimums [E, R, K / 32]; q4f16_1 passes its scales again as the minimums, which
    the kernel then ignores). ``shared_x``: every slot reads the same x [1, K]
    (gate_up), else slot s reads x[s] (down). Grid (CTAs, top_k); only the chosen experts'
    weights are read (mc::gemv_expert, mc::gemv_q4_expert).
    """
    n, k = out_features, in_features
    rows = 2 * n if mode == "silu" else n
    x_rows, x_stride = (1, 0) if shared_x else (top_k, k)
    mode_id = GEMV_MODES[mode]
    x_dtype = "float16" if q4 else dtype
    x_elements = gemv_x_elements(k, x_dtype)
    if q4 is None:
        extern = f"mc::gemv_expert<{CTYPES[dtype]}, {CTYPES[out_dtype]}, {k}, {mode_id}>"
        ctas = _gemv_ctas(n)

        @T.prim_func(private=True, s_tir=True)
        def func(x: T.Buffer((x_rows, k), dtype), idx: T.Buffer((top_k,), "int32"),
                 w: T.Buffer((experts, rows, k), dtype), y: T.Buffer((top_k, n), out_dtype)):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            for _bx in T.thread_binding(ctas, thread="blockIdx.x"):
                for _by in T.thread_binding(top_k, thread="blockIdx.y"):
                    for _tx in T.thread_binding(GEMV_WARPS * 32, thread="threadIdx.x"):
                        with T.sblock("gemv_expert"):
                            T.reads(x[0:x_rows, 0:k], idx[0:top_k], w[0:experts, 0:rows, 0:k])
                            T.writes(y[0:top_k, 0:n])
                            xs = T.alloc_buffer((x_elements,), dtype, scope="shared.dyn")
                            T.evaluate(T.call_extern(
                                "void", extern, x.access_ptr("r"), x_stride, idx.access_ptr("r"),
                                w.access_ptr("r"), y.access_ptr("w"), n, xs.access_ptr("rw")))

        return func
    with_min = q4 == "q4f16_2"
    extern = (f"mc::gemv_q4_expert<{CTYPES[out_dtype]}, {k}, {mode_id}, "
              f"{'true' if with_min else 'false'}>")
    ctas = _gemv_ctas(n, GEMV_Q4_MAX_CTAS)

    @T.prim_func(private=True, s_tir=True)
    def func_q4_min(x: T.Buffer((x_rows, k), "float16"), idx: T.Buffer((top_k,), "int32"),
                    q_weight: T.Buffer((experts, rows, k // 8), "uint32"),
                    q_scale: T.Buffer((experts, rows, k // 32), "float16"),
                    q_min: T.Buffer((experts, rows, k // 32), "float16"),
                    y: T.Buffer((top_k, n), out_dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for _bx in T.thread_binding(ctas, thread="blockIdx.x"):
            for _by in T.thread_binding(top_k, thread="blockIdx.y"):
                for _tx in T.thread_binding(GEMV_WARPS * 32, thread="threadIdx.x"):
                    with T.sblock("gemv_q4_expert"):
                        T.reads(x[0:x_rows, 0:k], idx[0:top_k],
                                q_weight[0:experts, 0:rows, 0:k // 8],
                                q_scale[0:experts, 0:rows, 0:k // 32],
                                q_min[0:experts, 0:rows, 0:k // 32])
                        T.writes(y[0:top_k, 0:n])
                        xs = T.alloc_buffer((x_elements,), "float16", scope="shared.dyn")
                        T.evaluate(T.call_extern(
                            "void", extern, x.access_ptr("r"), x_stride, idx.access_ptr("r"),
                            q_weight.access_ptr("r"), q_scale.access_ptr("r"),
                            q_min.access_ptr("r"), y.access_ptr("w"), n, xs.access_ptr("rw")))

    return func_q4_min


@functools.cache
def dequantize_q4(out_features: int, in_features: int, with_min: bool = False) -> tirx.PrimFunc:
    """The float16 [N, K] weight of 4-bit codes and scales, for prefill (mc::dequantize_q4).

    ``with_min``: q4f16_2's, from codes, scales and minimums (mc::dequantize_q4_min).
    """
    n, k = out_features, in_features
    groups = n * k // 32
    blocks = (groups + 255) // 256

    if not with_min:
        @T.prim_func(private=True, s_tir=True)
        def func(q_weight: T.Buffer((n, k // 8), "uint32"),
                 q_scale: T.Buffer((n, k // 32), "float16"), w: T.Buffer((n, k), "float16")):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            for _bx in T.thread_binding(blocks, thread="blockIdx.x"):
                for _tx in T.thread_binding(256, thread="threadIdx.x"):
                    with T.sblock("dequantize_q4"):
                        T.reads(q_weight[0:n, 0:k // 8], q_scale[0:n, 0:k // 32])
                        T.writes(w[0:n, 0:k])
                        T.evaluate(T.call_extern("void", "mc::dequantize_q4",
                                                 q_weight.access_ptr("r"),
                                                 q_scale.access_ptr("r"), w.access_ptr("w"),
                                                 groups))

        return func

    @T.prim_func(private=True, s_tir=True)
    def func_min(q_weight: T.Buffer((n, k // 8), "uint32"),
                 q_scale: T.Buffer((n, k // 32), "float16"),
                 q_min: T.Buffer((n, k // 32), "float16"), w: T.Buffer((n, k), "float16")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for _bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("dequantize_q4"):
                    T.reads(q_weight[0:n, 0:k // 8], q_scale[0:n, 0:k // 32],
                            q_min[0:n, 0:k // 32])
                    T.writes(w[0:n, 0:k])
                    T.evaluate(T.call_extern("void", "mc::dequantize_q4_min",
                                             q_weight.access_ptr("r"), q_scale.access_ptr("r"),
                                             q_min.access_ptr("r"), w.access_ptr("w"), groups))

    return func_min


def on_cuda() -> bool:
    """Whether the model is being built for a CUDA target (our kernels apply)."""
    target = Target.current(allow_none=True)
    return target is not None and target.kind.name == "cuda"


def rms_norm_supported(hidden: int, dtype: str) -> bool:
    """Whether rms_norm takes rows of this width and dtype (on a CUDA target)."""
    return on_cuda() and dtype in CTYPES and hidden % 8 == 0 and hidden <= 16384


ARGMAX_THREADS = 1024


def argmax_supported(vocab: int) -> bool:
    """Whether the device argmax applies (a CUDA target; any row length)."""
    return on_cuda() and vocab > 0


@functools.cache
def argmax(vocab: int) -> tirx.PrimFunc:
    """Each row's first index of its largest logit: greedy decoding on the device."""
    @T.prim_func(private=True, s_tir=True)
    def func(x_handle: T.handle, out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        x = T.match_buffer(x_handle, (b, 1, vocab), "float32")
        out = T.match_buffer(out_handle, (b,), "int32")
        for _bx in T.thread_binding(b, thread="blockIdx.x"):
            for _tx in T.thread_binding(ARGMAX_THREADS, thread="threadIdx.x"):
                with T.sblock("argmax"):
                    T.reads(x[0:b, 0, 0:vocab])
                    T.writes(out[0:b])
                    T.evaluate(T.call_extern("void", "mc::argmax_rows", x.access_ptr("r"),
                                             vocab, out.access_ptr("w")))

    return func


@functools.cache
def rms_norm(hidden: int, dtype: str, eps: float) -> tirx.PrimFunc:
    """RMSNorm of x[b, s, hidden] with weight w, one CTA per row (float32 inside)."""
    extern = f"mc::rms_norm_rows<{CTYPES[dtype]}, {hidden}>"

    @T.prim_func(private=True, s_tir=True)
    def func(x_handle: T.handle, w: T.Buffer((hidden,), dtype), y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        x = T.match_buffer(x_handle, (b, s, hidden), dtype)
        y = T.match_buffer(y_handle, (b, s, hidden), dtype)
        for _bx in T.thread_binding(b * s, thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("rms_norm"):
                    T.reads(x[0:b, 0:s, 0:hidden], w[0:hidden])
                    T.writes(y[0:b, 0:s, 0:hidden])
                    T.evaluate(T.call_extern("void", extern, x.access_ptr("r"),
                                             w.access_ptr("r"), y.access_ptr("w"),
                                             T.float32(eps)))

    return func


GEMM_TILE = 128  # rows and columns of y per CTA (compiler/csrc/mc_kernels.cuh gemm_nt)
# gemm_wgmma (sm_90a): tile, threads and dynamic shared memory (WG_* in the header), and the
# workspace of its two TMA descriptors
WG_BM, WG_BN, WG_THREADS = 128, 256, 288
WG_SMEM = 4 * (128 + 256) * 64 * 2 + 1024 + 2 * 4 * 8
TMA_MAPS_BYTES = 2 * 128


def gemm_supported(out_features: int, in_features: int, dtype: str) -> bool:
    """Whether the tensor-core prefill GEMM handles this weight (float16, K a multiple of 32)."""
    return dtype == "float16" and in_features % 32 == 0 and out_features % 8 == 0


@functools.cache
def gemm(out_features: int, in_features: int, out_dtype: str) -> tirx.PrimFunc:
    """y[b, s, N] = x[b, s, K] @ W[N, K]^T on tensor cores (float16 in, float32 accumulation).

    WMMA (gemm_nt), for any CUDA arch; on sm_90 the model uses gemm_wgmma instead.
    """
    n, k = out_features, in_features
    extern = f"mc::gemm_nt<{CTYPES[out_dtype]}, {k}>"

    @T.prim_func(private=True, s_tir=True)
    def func(x_handle: T.handle, w: T.Buffer((n, k), "float16"), y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        x = T.match_buffer(x_handle, (b, s, k), "float16")
        y = T.match_buffer(y_handle, (b, s, n), out_dtype)
        for _bx in T.thread_binding((n + GEMM_TILE - 1) // GEMM_TILE, thread="blockIdx.x"):
            for _by in T.thread_binding((b * s + GEMM_TILE - 1) // GEMM_TILE, thread="blockIdx.y"):
                for _tx in T.thread_binding(256, thread="threadIdx.x"):
                    with T.sblock("gemm"):
                        T.reads(x[0:b, 0:s, 0:k], w[0:n, 0:k])
                        T.writes(y[0:b, 0:s, 0:n])
                        T.evaluate(T.call_extern("void", extern, x.access_ptr("r"),
                                                 w.access_ptr("r"), y.access_ptr("w"),
                                                 T.Cast("int32", b * s), n))

    return func


GEMM_EPILOGUES = {"plain": 0, "residual": 1, "silu": 2}  # GEMM_* in the header
GEMM_PARTIAL = 3  # the split-K tiles' float32 partials (GEMM_PARTIAL in the header)


# A batched step's projections (measured alone on the H200, scripts/gpu/gemm_check.py, 7B
# shape, microseconds per layer at 1 / 8 / 64 / 128 rows): the 128 x 256 wgmma tiles 256 / 255 /
# 268 / 343 (N / 256 CTAs: 16 for a 4096-wide output), the same tiles with K split to fill the
# SMs 167 / 162 / 187 / 235, mc::skinny_partial 212 / 224 / 453 / 841. So float16 steps of up
# to WG_BM rows split K (wgmma_splits), one row runs the batch-1 GEMV (mc::gemv, about 83% of
# the copy bandwidth), and 4-bit weights run the skinny kernel, which dequantizes in its loads,
# up to SKINNY_MAX_ROWS_Q4 rows (19.06 ms a 64-row step against 31.07 ms for dequantize + wgmma).
SKINNY_MAX_ROWS_Q4 = 128
SKINNY_SLAB, SKINNY_WARPS = 64, 4  # mc_kernels.cuh SK_SLAB, SK_WARPS
TARGET_SKINNY_CTAS = 264  # two per SM of an H100/H200
SPLIT_TARGET_CTAS = 132  # one wave of the wgmma tiles (one CTA per SM) on an H100/H200


def wgmma_splits(weight_rows: int, k: int) -> int:
    """K splits of the wgmma tiles for a step of <= WG_BM rows: one CTA per SM in all."""
    return max(1, min(k // 64, SPLIT_TARGET_CTAS // -(-weight_rows // WG_BN)))


def skinny_splits(n: int, k: int) -> int:
    """How many CTAs share a weight row's K in mc::skinny_partial: enough CTAs for the GPU."""
    ctas = -(-n // (16 * SKINNY_WARPS))
    return max(1, min(k // 128, -(-TARGET_SKINNY_CTAS // ctas)))


def wgmma_supported(in_features: int, dtype: str) -> bool:
    """Whether gemm_wgmma applies: a CUDA sm_90 target, float16, K a multiple of 64."""
    target = Target.current(allow_none=True)
    return (target is not None and target.kind.name == "cuda" and target.arch == "sm_90"
            and dtype == "float16" and in_features % 64 == 0)


@functools.cache
def gemm_wgmma(out_features: int, in_features: int, out_dtype: str,
               epilogue: str = "plain") -> tirx.PrimFunc:
    """y[b, s, N'] = x[b, s, K] @ W[N, K]^T on Hopper's warpgroup MMA (sm_90a).

    Two launches: one warp writes the TMA descriptors of x and W into a 256-byte workspace;
    then 128 x 256 tiles, fed by TMA through 4 shared-memory stages, float32 accumulation. A
    batched step of up to WG_BM rows splits K over wgmma_splits CTAs per tile (those tiles alone
    would leave most SMs idle: N / 256 CTAs) and mc::skinny_epilogue sums the splits; a step of
    one row runs the batch-1 GEMV. The epilogue "residual" adds res[b, s, N] (an extra argument
    before y); "silu" takes W = [gate; up] and writes silu(x gate^T) * (x up^T), N' = N / 2.
    """
    n, k = out_features, in_features
    outputs = n // 2 if epilogue == "silu" else n
    wgmma_launches = _wgmma_macro(n, k, out_dtype, epilogue)
    splits = wgmma_splits(n, k)
    split_launches = _wgmma_split_macro(n, k, out_dtype, epilogue, splits)
    one_row = gemv_supported(k, "float16")
    gemv_launch = _gemv_row_macro(n, k, out_dtype, epilogue, 0)

    @T.macro
    def launches(x, w, y, extra_reads, *extra_args):  # noqa: ANN001, ANN002, ANN202
        # TVMScript has no optional parameter: the two prim_funcs below share these launches
        b, s = x.shape[0], x.shape[1]
        if one_row and b * s == 1:
            gemv_launch(x, [w], y, extra_reads, *extra_args)
        elif splits > 1 and b * s <= WG_BM:  # a batched step's rows
            split_launches(x, w, y, extra_reads, *extra_args)
        else:
            wgmma_launches(x, w.access_ptr("r"), [w[0:n, 0:k]], y, extra_reads, *extra_args)

    @T.prim_func(private=True, s_tir=True)
    def with_residual(x_handle: T.handle, w: T.Buffer((n, k), "float16"), res_handle: T.handle,
                      y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        x = T.match_buffer(x_handle, (b, s, k), "float16")
        res = T.match_buffer(res_handle, (b, s, outputs), out_dtype)
        y = T.match_buffer(y_handle, (b, s, outputs), out_dtype)
        launches(x, w, y, [res[0:b, 0:s, 0:outputs]], res.access_ptr("r"))

    @T.prim_func(private=True, s_tir=True)
    def func(x_handle: T.handle, w: T.Buffer((n, k), "float16"), y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        x = T.match_buffer(x_handle, (b, s, k), "float16")
        y = T.match_buffer(y_handle, (b, s, outputs), out_dtype)
        launches(x, w, y, [])

    return with_residual if epilogue == "residual" else func


MOE_ALIGN_THREADS = 1024


def moe_rows(tokens: tirx.PrimExpr, experts: int, top_k: int) -> tirx.PrimExpr:
    """Rows of moe_align's layout: the T k pairs, each expert's run padded to WG_BM rows."""
    return tirx.floordiv(tokens * top_k + experts * (WG_BM - 1) + WG_BM - 1, WG_BM) * WG_BM


@functools.cache
def moe_align(experts: int) -> tirx.PrimFunc:
    """mc::moe_align: each (token, chosen expert) pair's row in the grouped layout.

    expert [P] int32 -> rows [M] (the pair in each row, -1 padding), tile_expert [M / WG_BM]
    (-1 past the last run), where [P] (each pair's row).
    """
    extern = f"mc::moe_align<{experts}>"

    @T.prim_func(private=True, s_tir=True)
    def func(expert_handle: T.handle, rows_handle: T.handle, tiles_handle: T.handle,
             where_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        pairs, m, tiles = T.int64(), T.int64(), T.int64()
        expert = T.match_buffer(expert_handle, (pairs,), "int32")
        rows = T.match_buffer(rows_handle, (m,), "int32")
        tile_expert = T.match_buffer(tiles_handle, (tiles,), "int32")
        where = T.match_buffer(where_handle, (pairs,), "int32")
        for _bx in T.thread_binding(1, thread="blockIdx.x"):
            for _tx in T.thread_binding(MOE_ALIGN_THREADS, thread="threadIdx.x"):
                with T.sblock("moe_align"):
                    T.reads(expert[0:pairs])
                    T.writes(rows[0:m], tile_expert[0:tiles], where[0:pairs])
                    T.evaluate(T.call_extern(
                        "void", extern, expert.access_ptr("r"), T.Cast("int32", pairs),
                        rows.access_ptr("w"), tile_expert.access_ptr("w"),
                        where.access_ptr("w"), T.Cast("int32", m)))

    return func


@functools.cache
def moe_gather(hidden: int, top_k: int) -> tirx.PrimFunc:
    """mc::moe_gather: x [T, H] float16 -> xs [1, M, H], each row its pair's token (or 0)."""
    extern = f"mc::moe_gather<{hidden}, {top_k}>"

    @T.prim_func(private=True, s_tir=True)
    def func(x_handle: T.handle, rows_handle: T.handle, xs_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        t, m = T.int64(), T.int64()
        x = T.match_buffer(x_handle, (t, hidden), "float16")
        rows = T.match_buffer(rows_handle, (m,), "int32")
        xs = T.match_buffer(xs_handle, (1, m, hidden), "float16")
        for _bx in T.thread_binding(T.max(1, T.ceildiv(m * (hidden // 8), 256)),
                                    thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("moe_gather"):
                    T.reads(x[0:t, 0:hidden], rows[0:m])
                    T.writes(xs[0, 0:m, 0:hidden])
                    T.evaluate(T.call_extern("void", extern, x.access_ptr("r"),
                                             rows.access_ptr("r"), T.Cast("int32", m),
                                             xs.access_ptr("w")))

    return func


@functools.cache
def moe_combine(hidden: int, top_k: int, out_dtype: str) -> tirx.PrimFunc:
    """mc::moe_combine: y [1, M, H] float32, where [P], weight [P] -> out [T, H] (out_dtype)."""
    extern = f"mc::moe_combine<{CTYPES[out_dtype]}, {hidden}, {top_k}>"

    @T.prim_func(private=True, s_tir=True)
    def func(y_handle: T.handle, where_handle: T.handle, weight_handle: T.handle,
             out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        m, pairs, t = T.int64(), T.int64(), T.int64()
        y = T.match_buffer(y_handle, (1, m, hidden), "float32")
        where = T.match_buffer(where_handle, (pairs,), "int32")
        weight = T.match_buffer(weight_handle, (pairs,), "float32")
        out = T.match_buffer(out_handle, (t, hidden), out_dtype)
        for _bx in T.thread_binding(T.max(1, T.ceildiv(t * hidden, 256)), thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("moe_combine"):
                    T.reads(y[0, 0:m, 0:hidden], where[0:pairs], weight[0:pairs])
                    T.writes(out[0:t, 0:hidden])
                    T.evaluate(T.call_extern("void", extern, y.access_ptr("r"),
                                             where.access_ptr("r"), weight.access_ptr("r"),
                                             T.Cast("int32", t), out.access_ptr("w")))

    return func


@functools.cache
def gemm_wgmma_grouped(out_features: int, in_features: int, experts: int, out_dtype: str,
                       epilogue: str = "plain") -> tirx.PrimFunc:
    """y[1, M, N'] = xs[1, M, K] @ W[e(tile), N, K]^T: each WG_BM-row tile against its expert.

    mc::gemm_wgmma over moe_align's layout: W's descriptor spans the stacked [E N, K] weight and
    each tile starts at its expert's rows (tile_expert; -1 tiles do nothing). Epilogues as
    gemm_wgmma's ("silu": W[e] is [gate; up]).
    """
    n, k = out_features, in_features
    outputs = n // 2 if epilogue == "silu" else n
    wgmma_launches = _wgmma_macro(n, k, out_dtype, epilogue, w_rows=experts * n)

    @T.prim_func(private=True, s_tir=True)
    def func(x_handle: T.handle, w: T.Buffer((experts, n, k), "float16"), tiles_handle: T.handle,
             y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()  # 1; named as gemm_wgmma's, whose launch macros read b and s
        s = T.int64()
        tiles = T.int64()
        x = T.match_buffer(x_handle, (b, s, k), "float16")
        tile_expert = T.match_buffer(tiles_handle, (tiles,), "int32")
        y = T.match_buffer(y_handle, (b, s, outputs), out_dtype)
        # aux (unread by these epilogues) stands in as y; then the tiles' experts
        wgmma_launches(x, w.access_ptr("r"), [w[0:experts, 0:n, 0:k]], y,
                       [tile_expert[0:tiles]], y.access_ptr("r"), tile_expert.access_ptr("r"),
                       n)

    return func


def _gemv_row_macro(n: int, k: int, out_dtype: str, epilogue: str, q4: int):  # noqa: ANN202
    """A step of one row on the batch-1 GEMV (mc::gemv, mc::gemv_q4), as a TIR macro.

    ``q4``: 0 float16, 1 q4f16_1, 2 q4f16_2; ``weights`` are [w] (float16), [codes, scales] or
    [codes, scales, minimums]. The GEMV's aux operand is the residual, or x (unread) without one.
    """
    outputs = n // 2 if epilogue == "silu" else n
    mode = GEMV_MODES[epilogue]  # plain, residual and silu: the same names
    if q4:
        extern = f"mc::gemv_q4<{CTYPES[out_dtype]}, {k}, {mode}" + (
            ", mc::Q4Dot, mc::SameRow, true>" if q4 == 2 else ">")
        ctas = _gemv_ctas(outputs, GEMV_Q4_MAX_CTAS)
    else:
        extern = f"mc::gemv<half, {CTYPES[out_dtype]}, {k}, {mode}>"
        ctas = _gemv_ctas(outputs)

    x_elements = gemv_x_elements(k, "float16")
    with_qm = q4 != 0  # gemv_q4 takes the minimums (or the scales standing in) before xs_dyn

    @T.macro
    def gemv_launch(x, weights, y, extra_reads, *extra_args):  # noqa: ANN001, ANN002, ANN202
        b, s = x.shape[0], x.shape[1]
        for _bx in T.thread_binding(ctas, thread="blockIdx.x"):
            for _tx in T.thread_binding(GEMV_WARPS * 32, thread="threadIdx.x"):
                with T.sblock("gemv_row"):
                    T.reads(x[0:b, 0:s, 0:k], *[wt[0:wt.shape[0], 0:wt.shape[1]]
                                                for wt in weights], *extra_reads)
                    T.writes(y[0:b, 0:s, 0:outputs])
                    xs = T.alloc_buffer((x_elements,), "float16", scope="shared.dyn")
                    # q4: the minimums, or the scales standing in for them (unread)
                    T.evaluate(T.call_extern(
                        "void", extern, x.access_ptr("r"), *(extra_args or [x.access_ptr("r")]),
                        *[wt.access_ptr("r") for wt in weights[:2]], y.access_ptr("w"), outputs,
                        T.float32(0), *([weights[-1].access_ptr("r")] if with_qm else []),
                        xs.access_ptr("rw")))

    return gemv_launch


def _tma_maps_macro(n: int, k: int):  # noqa: ANN202
    """One warp's launch that writes the TMA descriptors of x and W [n, k] into ``maps``.

    ``w_ptr``: the address of W (an expert's of stacked weights: an offset into them).
    """
    extern = f"mc::gemm_wgmma_maps<{k}>"

    @T.macro
    def write_maps(x, w_ptr, maps):  # noqa: ANN001, ANN202
        b, s = x.shape[0], x.shape[1]
        for _bx in T.thread_binding(1, thread="blockIdx.x"):
            for _tx in T.thread_binding(32, thread="threadIdx.x"):
                with T.sblock("tma_maps"):
                    T.reads()
                    T.writes(maps[0:TMA_MAPS_BYTES])
                    T.evaluate(T.call_extern("void", extern, x.access_ptr("r"), w_ptr,
                                             T.Cast("int32", b * s), n, maps.access_ptr("w")))

    return write_maps


def _wgmma_split_macro(n: int, k: int, out_dtype: str, epilogue: str, splits: int):  # noqa: ANN202
    """mc::gemm_wgmma with K split over ``splits`` CTAs (GEMM_PARTIAL), then the epilogue."""
    extern = f"mc::gemm_wgmma<float, {k}, {GEMM_PARTIAL}>"
    write_maps = _tma_maps_macro(n, k)
    finish = _split_epilogue_macro(n, out_dtype, epilogue)

    @T.macro
    def split_launches(x, w, y, extra_reads, *extra_args):  # noqa: ANN001, ANN002, ANN202
        b, s = x.shape[0], x.shape[1]
        maps = T.alloc_buffer((TMA_MAPS_BYTES,), "uint8")
        ws = T.alloc_buffer((splits * b * s * n,), "float32")
        write_maps(x, w.access_ptr("r"), maps)
        for _bx in T.thread_binding((b * s + WG_BM - 1) // WG_BM, thread="blockIdx.x"):
            for _by in T.thread_binding((n + WG_BN - 1) // WG_BN, thread="blockIdx.y"):
                for _bz in T.thread_binding(splits, thread="blockIdx.z"):
                    for _tx in T.thread_binding(WG_THREADS, thread="threadIdx.x"):
                        with T.sblock("gemm_partial"):
                            T.reads(maps[0:TMA_MAPS_BYTES], x[0:b, 0:s, 0:k], w[0:n, 0:k])
                            T.writes(ws[0:splits * b * s * n])
                            smem = T.alloc_buffer((WG_SMEM // 2,), "float16",
                                                  scope="shared.dyn")
                            T.evaluate(T.call_extern("void", extern, maps.access_ptr("r"),
                                                     ws.access_ptr("w"), T.Cast("int32", b * s),
                                                     n, smem.access_ptr("rw")))
        finish(ws, splits, x, y, extra_reads, *extra_args)

    return split_launches


def _split_epilogue_macro(n: int, out_dtype: str, epilogue: str):  # noqa: ANN202
    """mc::skinny_epilogue: the K splits' float32 partials ws [splits, rows, n] summed into y."""
    outputs = n // 2 if epilogue == "silu" else n
    finish = f"mc::skinny_epilogue<{CTYPES[out_dtype]}, {GEMM_EPILOGUES[epilogue]}>"

    @T.macro
    def finish_launch(ws, splits, x, y, extra_reads, *extra_args):  # noqa: ANN001, ANN002, ANN202
        b, s = x.shape[0], x.shape[1]
        for _bx in T.thread_binding(T.min(2048, T.ceildiv(b * s * outputs, 256)),
                                    thread="blockIdx.x"):
            for _tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("split_epilogue"):
                    T.reads(ws[0:splits * b * s * n], *extra_reads)
                    T.writes(y[0:b, 0:s, 0:outputs])
                    T.evaluate(T.call_extern(
                        "void", finish, ws.access_ptr("r"), splits, T.Cast("int32", b * s),
                        n, y.access_ptr("w"), *(extra_args or [y.access_ptr("r")])))

    return finish_launch


def _wgmma_macro(n: int, k: int, out_dtype: str, epilogue: str,  # noqa: ANN202
                 w_rows: int | None = None):
    """The two launches of mc::gemm_wgmma (TMA descriptors, then the tiles) as a TIR macro.

    ``w_rows``: the rows of W's descriptor (grouped experts: all E * n of them), default n.
    """
    outputs = n // 2 if epilogue == "silu" else n
    cols = WG_BN // 2 if epilogue == "silu" else WG_BN
    extern = f"mc::gemm_wgmma<{CTYPES[out_dtype]}, {k}, {GEMM_EPILOGUES[epilogue]}>"
    write_maps = _tma_maps_macro(w_rows or n, k)
    grid_n = (outputs + cols - 1) // cols

    @T.macro
    def wgmma_launches(x, w_ptr, w_reads, y, extra_reads, *extra_args):  # noqa: ANN001, ANN002, ANN202
        b, s = x.shape[0], x.shape[1]
        maps = T.alloc_buffer((TMA_MAPS_BYTES,), "uint8")
        write_maps(x, w_ptr, maps)
        for _bx in T.thread_binding((b * s + WG_BM - 1) // WG_BM, thread="blockIdx.x"):
            for _by in T.thread_binding(grid_n, thread="blockIdx.y"):
                for _tx in T.thread_binding(WG_THREADS, thread="threadIdx.x"):
                    with T.sblock("gemm"):
                        T.reads(maps[0:TMA_MAPS_BYTES], x[0:b, 0:s, 0:k], *w_reads,
                                *extra_reads)
                        T.writes(y[0:b, 0:s, 0:outputs])
                        smem = T.alloc_buffer((WG_SMEM // 2,), "float16", scope="shared.dyn")
                        T.evaluate(T.call_extern("void", extern, maps.access_ptr("r"),
                                                 y.access_ptr("w"), T.Cast("int32", b * s),
                                                 outputs, smem.access_ptr("rw"), *extra_args))

    return wgmma_launches


def _skinny_macro(n: int, k: int, out_dtype: str, epilogue: str, q4: int):  # noqa: ANN202
    """mc::skinny_partial (K split over skinny_splits CTAs) and mc::skinny_epilogue, as a macro.

    ``q4``: 1 q4f16_1 (w codes, scales), 2 q4f16_2 (also minimums). The kernel's float16 form
    (0) is only the baseline of scripts/gpu/gemm_check.py: float16 steps run the split wgmma.
    """
    splits = skinny_splits(n, k)
    partial = f"mc::skinny_partial<{k}, {q4}>"
    finish = _split_epilogue_macro(n, out_dtype, epilogue)
    words = k // 8

    @T.macro
    def skinny_launches(x, w, scales, mins, y, extra_reads, *extra_args):  # noqa: ANN001, ANN002, ANN202
        b, s = x.shape[0], x.shape[1]
        ws = T.alloc_buffer((splits * b * s * n,), "float32")
        for _bx in T.thread_binding(-(-n // (16 * SKINNY_WARPS)), thread="blockIdx.x"):
            for _by in T.thread_binding(splits, thread="blockIdx.y"):
                for _bz in T.thread_binding((b * s + SKINNY_SLAB - 1) // SKINNY_SLAB,
                                            thread="blockIdx.z"):
                    for _tx in T.thread_binding(32 * SKINNY_WARPS, thread="threadIdx.x"):
                        with T.sblock("skinny"):
                            T.reads(x[0:b, 0:s, 0:k], w[0:n, 0:words])
                            T.writes(ws[0:splits * b * s * n])
                            T.evaluate(T.call_extern(
                                "void", partial, x.access_ptr("r"), T.Cast("int32", b * s),
                                w.access_ptr("r"), scales.access_ptr("r"),
                                mins.access_ptr("r"), n, ws.access_ptr("w")))
        finish(ws, splits, x, y, extra_reads, *extra_args)

    return skinny_launches


@functools.cache
def gemm_q4(out_features: int, in_features: int, out_dtype: str, epilogue: str = "plain",
            with_min: bool = False) -> tirx.PrimFunc:
    """gemm_wgmma with 4-bit weights: codes, scales, minimums (q4f16_1: its scales, unread).

    One row runs the batch-1 GEMV (mc::gemv_q4); up to SKINNY_MAX_ROWS_Q4 rows
    mc::skinny_partial dequantizes in its loads (the weight is read once, 4.5 bits a weight);
    more rows (prefill) dequantize to a float16 workspace first.
    """
    n, k = out_features, in_features
    outputs = n // 2 if epilogue == "silu" else n
    wgmma_launches = _wgmma_macro(n, k, out_dtype, epilogue)
    skinny_launches = _skinny_macro(n, k, out_dtype, epilogue, 2 if with_min else 1)
    gemv_launch = _gemv_row_macro(n, k, out_dtype, epilogue, 2 if with_min else 1)
    one_row = gemv_supported(k, "float16")
    dequantize = f"mc::dequantize_q4_any<{'true' if with_min else 'false'}>"
    groups = n * k // 32

    @T.macro
    def launches(x, qw, qs, qm, y, extra_reads, *extra_args):  # noqa: ANN001, ANN002, ANN202
        b, s = x.shape[0], x.shape[1]
        if one_row and b * s == 1:
            gemv_launch(x, [qw, qs, qm] if with_min else [qw, qs], y, extra_reads, *extra_args)
        elif b * s <= SKINNY_MAX_ROWS_Q4:
            skinny_launches(x, qw, qs, qm, y, extra_reads, *extra_args)
        else:
            dense = T.alloc_buffer((n, k), "float16")
            for _bx in T.thread_binding((groups + 255) // 256, thread="blockIdx.x"):
                for _tx in T.thread_binding(256, thread="threadIdx.x"):
                    with T.sblock("dequantize_q4"):
                        T.reads(qw[0:n, 0:k // 8], qs[0:n, 0:k // 32], qm[0:n, 0:k // 32])
                        T.writes(dense[0:n, 0:k])
                        T.evaluate(T.call_extern("void", dequantize, qw.access_ptr("r"),
                                                 qs.access_ptr("r"), qm.access_ptr("r"),
                                                 dense.access_ptr("w"), groups))
            wgmma_launches(x, dense.access_ptr("r"), [dense[0:n, 0:k]], y, extra_reads,
                           *extra_args)

    @T.prim_func(private=True, s_tir=True)
    def with_residual(x_handle: T.handle, qw: T.Buffer((n, k // 8), "uint32"),
                      qs: T.Buffer((n, k // 32), "float16"), qm: T.Buffer((n, k // 32), "float16"),
                      res_handle: T.handle, y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        x = T.match_buffer(x_handle, (b, s, k), "float16")
        res = T.match_buffer(res_handle, (b, s, outputs), out_dtype)
        y = T.match_buffer(y_handle, (b, s, outputs), out_dtype)
        launches(x, qw, qs, qm, y, [res[0:b, 0:s, 0:outputs]], res.access_ptr("r"))

    @T.prim_func(private=True, s_tir=True)
    def func(x_handle: T.handle, qw: T.Buffer((n, k // 8), "uint32"),
             qs: T.Buffer((n, k // 32), "float16"), qm: T.Buffer((n, k // 32), "float16"),
             y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        x = T.match_buffer(x_handle, (b, s, k), "float16")
        y = T.match_buffer(y_handle, (b, s, outputs), out_dtype)
        launches(x, qw, qs, qm, y, [])

    return with_residual if epilogue == "residual" else func
