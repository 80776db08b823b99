"""Weight name maps as plain data: each model parameter and the source tensors that make it."""

from __future__ import annotations

from dataclasses import dataclass

from mistral_compile.config import MistralConfig

HF = "hf"
NATIVE = "mistral"
GGUF = "gguf"
# Source tensors that carry no weights (buffers some exporters save); skipped silently.
IGNORED_SOURCE_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ParamSource:
    """How one model parameter is built: concatenate ``sources`` on axis 0.

    ``rope_heads[i]`` is nonzero when source i is a Mistral-native or GGUF q/k whose rows are in
    interleaved RoPE order and must be permuted into the rotate-half order our kernels use.
    """

    sources: tuple[str, ...]
    rope_heads: tuple[int, ...]
    rows: tuple[int, ...] | None = None  # rows taken from each source (None: one source)
    stacked: bool = False  # the parameter is [E, rows, ...]: the concatenation, one per expert


def _native_names(i: int) -> dict[str, str]:
    return {"q": f"layers.{i}.attention.wq.weight", "k": f"layers.{i}.attention.wk.weight",
            "v": f"layers.{i}.attention.wv.weight", "o": f"layers.{i}.attention.wo.weight",
            "gate": f"layers.{i}.feed_forward.w1.weight",
            "up": f"layers.{i}.feed_forward.w3.weight",
            "down": f"layers.{i}.feed_forward.w2.weight",
            "in_norm": f"layers.{i}.attention_norm.weight",
            "post_norm": f"layers.{i}.ffn_norm.weight"}


def _hf_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}"
    return {"q": f"{p}.self_attn.q_proj.weight", "k": f"{p}.self_attn.k_proj.weight",
            "v": f"{p}.self_attn.v_proj.weight", "o": f"{p}.self_attn.o_proj.weight",
            "gate": f"{p}.mlp.gate_proj.weight", "up": f"{p}.mlp.up_proj.weight",
            "down": f"{p}.mlp.down_proj.weight", "in_norm": f"{p}.input_layernorm.weight",
            "post_norm": f"{p}.post_attention_layernorm.weight"}


def _gguf_names(i: int) -> dict[str, str]:
    p = f"blk.{i}"
    return {"q": f"{p}.attn_q.weight", "k": f"{p}.attn_k.weight", "v": f"{p}.attn_v.weight",
            "o": f"{p}.attn_output.weight", "gate": f"{p}.ffn_gate.weight",
            "up": f"{p}.ffn_up.weight", "down": f"{p}.ffn_down.weight",
            "in_norm": f"{p}.attn_norm.weight", "post_norm": f"{p}.ffn_norm.weight"}


_TOP = {NATIVE: {"embed": "tok_embeddings.weight", "norm": "norm.weight", "head": "output.weight"},
        HF: {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
             "head": "lm_head.weight"},
        GGUF: {"embed": "token_embd.weight", "norm": "output_norm.weight",
               "head": "output.weight"}}
_LAYER = {NATIVE: _native_names, HF: _hf_names, GGUF: _gguf_names}


def build_name_map(config: MistralConfig, source_format: str) -> dict[str, ParamSource]:
    """Model parameter name -> its sources, for an ``hf``, ``mistral`` or ``gguf`` checkpoint.

    Mistral-native and GGUF (llama.cpp) q/k rows are in interleaved RoPE order; HF's are not.
    """
    if source_format not in _TOP:
        raise ValueError(f"unknown source format {source_format!r}")
    interleaved = source_format in (NATIVE, GGUF)
    one = lambda name: ParamSource((name,), (0,))  # noqa: E731
    top = _TOP[source_format]
    mapping = {"model.embed_tokens.weight": one(top["embed"]),
               "model.norm.weight": one(top["norm"])}
    if not config.tie_word_embeddings:
        mapping["lm_head.weight"] = one(top["head"])
    q_heads = config.num_attention_heads if interleaved else 0
    k_heads = config.num_key_value_heads if interleaved else 0
    for i in range(config.num_hidden_layers):
        src = _LAYER[source_format](i)
        p = f"model.layers.{i}"
        qd, kd = config.num_attention_heads * config.head_dim, config.num_key_value_heads * \
            config.head_dim
        mapping[f"{p}.self_attn.qkv_proj.weight"] = ParamSource(
            (src["q"], src["k"], src["v"]), (q_heads, k_heads, 0), (qd, kd, kd))
        mapping[f"{p}.self_attn.o_proj.weight"] = one(src["o"])
        if config.is_moe:
            mapping.update(_moe_sources(config, source_format, i))
        else:
            mapping[f"{p}.mlp.gate_up_proj.weight"] = ParamSource(
                (src["gate"], src["up"]), (0, 0), (config.intermediate_size,) * 2)
            mapping[f"{p}.mlp.down_proj.weight"] = one(src["down"])
        mapping[f"{p}.input_layernorm.weight"] = one(src["in_norm"])
        mapping[f"{p}.post_attention_layernorm.weight"] = one(src["post_norm"])
    return mapping


def _moe_sources(config: MistralConfig, source_format: str, i: int) -> dict[str, ParamSource]:
    """Layer i's router and stacked experts from the per-expert w1 / w3 / w2 tensors.

    Hugging Face checkpoints as ``save_pretrained`` writes them (transformers 4 and 5 alike:
    ``block_sparse_moe.experts.E.w1``), and Mistral-native ``feed_forward.experts.E.w1``.
    """
    if source_format == GGUF:
        raise ValueError("mixture-of-experts GGUF files are refused by their config")
    block = f"model.layers.{i}.block_sparse_moe" if source_format == HF else \
        f"layers.{i}.feed_forward"
    inter, hidden, n = config.intermediate_size, config.hidden_size, config.num_local_experts
    # expert e's gate (w1), up (w3) and down (w2)
    experts = [{w: f"{block}.experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")}
               for e in range(n)]
    p = f"model.layers.{i}.mlp"
    return {
        f"{p}.gate.weight": ParamSource((f"{block}.gate.weight",), (0,)),
        f"{p}.experts.gate_up_proj.weight": ParamSource(
            tuple(name for ex in experts for name in (ex["w1"], ex["w3"])), (0,) * 2 * n,
            (inter,) * 2 * n, stacked=True),
        f"{p}.experts.down_proj.weight": ParamSource(
            tuple(ex["w2"] for ex in experts), (0,) * n, (hidden,) * n, stacked=True),
    }
