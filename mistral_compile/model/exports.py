"""What the library exports: the functions' signatures and the paged KV cache they share."""

from __future__ import annotations

from typing import Any

from tvm import relax as rx
from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from mistral_compile.config import MistralConfig
from mistral_compile.errors import ConfigError
from mistral_compile.model.kernels import own_attention_kernels
from mistral_compile.model.kv_paged import PAGE_SIZE, kv_groups
from mistral_compile.model.sampler import NUM_OPTIONS
from mistral_compile.model.window import exact_window_kernels


def attention_kinds(config: MistralConfig) -> tuple[list[str], int]:
    """Per-layer attention kinds for TVM's cache and the window its kernels mask with.

    Every layer windowed: all "mha" with the cache's per-sequence sliding window (which evicts
    pages, bounding memory). Mixed full/windowed layers: "mha_sliding" on windowed layers, which
    masks with absolute positions but keeps every page (the full layers bound the context anyway).
    TVM supports one window size for all windowed layers.
    """
    windows = config.layer_sliding_window_sizes
    sliding = sorted({w for w in windows if w > 0})
    if not sliding:
        return ["mha"] * len(windows), 1  # the cache requires a positive value even if unused
    if len(sliding) > 1:
        raise ConfigError("layer_sliding_window_sizes", f"layers use several window sizes "
                          f"{sliding}; only one window size is supported")
    if min(windows) > 0:
        return ["mha"] * len(windows), sliding[0]
    return ["mha_sliding" if w > 0 else "mha" for w in windows], sliding[0]


def paged_kv_cache(config: MistralConfig, dtype: str, max_batch_size: tirx.Var,
                   max_total_seq_len: tirx.Var, prefill_chunk_size: tirx.Var,
                   page_size: tirx.Var, support_sliding_window: tirx.Var) -> PagedKVCache:
    """TVM's paged KV cache for this model, with our attention kernels where they apply."""
    kinds, window = attention_kinds(config)
    with exact_window_kernels(), own_attention_kernels():
        return TIRPagedKVCache(
            attn_kind=kinds, max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, config.num_hidden_layers]),
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, qk_head_dim=config.head_dim,
            v_head_dim=config.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=config.position_embedding_base,
            rope_scaling={}, rope_ext_factors=rx.prim_value(0), rotary_dim=config.head_dim,
            enable_disaggregation=False, dtype=dtype, target=Target.current(),
            layer_sliding_window_size=window)


def module_spec(model: nn.Module) -> nn.spec.ModuleSpec:
    """The exported functions of ``model`` (MistralForCausalLM) and their argument shapes.

    ``decode`` takes the token id on the device and returns its logits and their argmax (also
    on the device), so a greedy loop feeds each step's output to the next without the host.
    ``prefill`` and ``decode`` use the model-owned cache (its storage is among the parameters);
    the ``*_paged`` pair does the same on TVM's paged cache, which the engine uses for sinks.
    ``batch_step`` runs a ragged batch on our paged cache, one table and pool per window group;
    ``sample`` and ``top_logprobs`` pick its tokens on the device (model/sampler.py).
    """
    config = model.config
    hidden, dtype = config.hidden_size, model.dtype
    groups = kv_groups(config)
    vocab = config.vocab_size
    plain = {"param_mode": "none", "effect_mode": "none"}
    cache = nn.spec.Object(object_type=PagedKVCache)
    packed = {"param_mode": "packed", "effect_mode": "none"}
    embeds = nn.spec.Tensor([1, "seq_len", hidden], dtype)
    mod_spec: dict[str, Any] = {
        "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
        "prefill": {"input_embed": embeds, "$": packed},
        "decode": {"input_ids": nn.spec.Tensor([1], "int32"), "$": packed},
        "prefill_paged": {"input_embed": embeds, "cache": cache, "$": packed},
        "decode_paged": {"input_ids": nn.spec.Tensor([1], "int32"), "cache": cache,
                         "$": packed},
        "batch_step": {
            "input_ids": nn.spec.Tensor(["num_tokens"], "int32"),
            "positions": nn.spec.Tensor(["num_tokens"], "int32"),
            "rows": nn.spec.Tensor(["num_tokens"], "int32"),
            "logit_index": nn.spec.Tensor(["num_logits"], "int32"),
            "sinks": nn.spec.Tensor(["num_rows", "sink_columns"], "int32"),
            "tables": [nn.spec.Tensor(["num_rows", f"width_{g}"], "int32")
                       for g in range(len(groups))],
            "pools": [nn.spec.Tensor([f"pages_{g}", len(group.layers), 2,
                                      config.num_key_value_heads, PAGE_SIZE, config.head_dim],
                                     dtype) for g, group in enumerate(groups)],
            "$": packed},
        "sample": {"logits": nn.spec.Tensor(["num_logits", vocab], "float32"),
                   "options": nn.spec.Tensor(["num_logits", NUM_OPTIONS], "float32"),
                   "rng": nn.spec.Tensor(["num_logits", 2], "int32"),
                   "adjust": nn.spec.Tensor(["num_adjust", 4], "int32"),
                   "bias": nn.spec.Tensor(["num_adjust"], "float32"), "$": plain},
        "top_logprobs": {"logits": nn.spec.Tensor(["num_logits", vocab], "float32"),
                         "k": nn.spec.Tensor([1], "int32"), "$": plain},
        "create_paged_kv_cache": {
            "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
            "page_size": int, "support_sliding_window": int,
            "$": {"param_mode": "none", "effect_mode": "none"}},
    }
    return nn.spec.ModuleSpec.from_raw(mod_spec, model)
