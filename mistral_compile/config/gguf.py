"""MistralConfig from a GGUF file's metadata (llama.cpp's `llama` architecture: Mistral too)."""

from __future__ import annotations

from typing import Any

from mistral_compile.config.config import MistralConfig
from mistral_compile.errors import ConfigError

GGUF_ARCHITECTURES = ("llama",)  # llama.cpp stores Mistral 7B / Nemo / Small as `llama`
# MistralConfig field <- GGUF key (after "<arch>.")
_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "num_hidden_layers": "block_count",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "vocab_size": "vocab_size",
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
             "rms_norm_eps")
# Keys whose presence changes the network in ways we do not implement.
_UNSUPPORTED = {
    "expert_count": "mixture-of-experts (Mixtral) GGUF files are not supported yet",
    "rope.scaling.type": "RoPE scaling is not supported yet",
    "rope.scaling.factor": "RoPE scaling is not supported yet",
    "attention.sliding_window_pattern": "per-layer window patterns in GGUF are not supported",
}


def from_gguf(gguf: Any, overrides: dict[str, Any] | None = None) -> MistralConfig:
    """Build a config from ``gguf`` (a weights.gguf_io.GGUFFile); errors name the GGUF key."""
    from mistral_compile.config.readers import _build

    arch = gguf.meta("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError("general.architecture", f"{arch!r} is not supported (expected "
                          f"{', '.join(GGUF_ARCHITECTURES)})", str(gguf.path))
    key_names = {name: f"{arch}.{key}" for name, key in _KEYS.items()}
    try:
        for key, reason in _UNSUPPORTED.items():
            value = gguf.meta(f"{arch}.{key}")
            if value not in (None, 0, "none"):
                raise ConfigError(f"{arch}.{key}", f"is {value!r}: {reason}")
        args = {name: gguf.meta(f"{arch}.{key}") for name, key in _KEYS.items()}
        if args["vocab_size"] is None and gguf.has("tokenizer.ggml.tokens"):
            args["vocab_size"] = len(gguf.meta("tokenizer.ggml.tokens"))
            key_names["vocab_size"] = "tokenizer.ggml.tokens"
        head_dim = _head_dim(gguf, arch)
        if head_dim is not None:
            args["head_dim"] = head_dim
        args["tie_word_embeddings"] = "output.weight" not in gguf.tensors
        kwargs = {"rope_theta": gguf.meta(f"{arch}.rope.freq_base"),
                  "max_position_embeddings": gguf.meta(f"{arch}.context_length")}
        window = gguf.meta(f"{arch}.attention.sliding_window")
        if window:
            kwargs["sliding_window"] = int(window)
        return _build({k: v for k, v in args.items() if v is not None or k in _REQUIRED},
                      {k: v for k, v in kwargs.items() if v is not None}, overrides,
                      {**key_names, "position_embedding_base": f"{arch}.rope.freq_base",
                       "context_window_size": f"{arch}.context_length"})
    except ConfigError as err:
        err.source = str(gguf.path)
        raise


def _head_dim(gguf: Any, arch: str) -> int | None:
    """attention.key_length / value_length (else hidden / heads); RoPE must span all of it."""
    key, value = (gguf.meta(f"{arch}.attention.{k}_length") for k in ("key", "value"))
    if key is not None and value is not None and key != value:
        raise ConfigError(f"{arch}.attention.value_length", f"is {value}, key_length is {key}: "
                          "different key and value head sizes are not supported")
    head_dim = key if key is not None else value
    hidden, heads = (gguf.meta(f"{arch}.{k}") for k in ("embedding_length",
                                                         "attention.head_count"))
    implied = head_dim if head_dim is not None else \
        hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
    rope = gguf.meta(f"{arch}.rope.dimension_count")
    if rope is not None and implied is not None and rope != implied:
        raise ConfigError(f"{arch}.rope.dimension_count", f"is {rope} but the heads are "
                          f"{implied} wide: partial RoPE is not supported")
    return head_dim
