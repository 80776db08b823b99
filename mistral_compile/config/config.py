"""MistralConfig: the one dataclass that settles every derived decision about a model's shape."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from mistral_compile.errors import ConfigError

logger = logging.getLogger("mistral_compile.config")

FULL_ATTENTION = -1  # window value meaning "this layer attends to everything"
DEFAULT_ROPE_THETA = 10000.0
MAX_DEFAULT_PREFILL_CHUNK = 8192
_REQUIRED_INTS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                  "vocab_size")
# Optional fields whose null means "absent": they take their default (None: derived). A
# value that is given must be valid: 0 is an error, never a request to derive.
_OPTIONAL_INTS = {"num_key_value_heads": None, "head_dim": None, "context_window_size": None,
                  "sliding_window_size": None, "prefill_chunk_size": None,
                  "attention_sink_size": 4, "tensor_parallel_shards": 1, "max_batch_size": 1}
_MAX_INT = 1 << 31  # larger sizes are a typo, and TVM takes shapes as 32/64-bit integers
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "max_seq_len")
_ROPE_TYPES_SUPPORTED = (None, "default")


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere inside ``value`` (JSON cannot hold them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass
class MistralConfig:
    """Shape and runtime-layout decisions of a Mistral model (dense, or Mixtral's experts).

    None in an optional field means "derive it"; ``__post_init__`` derives it from ``kwargs``
    (the raw keys of the source config it does not map directly) and logs each fallback once.
    After construction every field holds a settled, validated value:

    * ``sliding_window_size``: the largest per-layer window, or -1 when no layer has a window.
    * ``layer_sliding_window_sizes``: one window per layer, -1 for full attention. This list is
      what the model uses.
    * ``context_window_size``: the longest sequence, or -1 (unbounded) when every layer is windowed.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    rms_norm_eps: float
    vocab_size: int
    position_embedding_base: float | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    context_window_size: int | None = None
    sliding_window_size: int | None = None
    prefill_chunk_size: int | None = None
    attention_sink_size: int = 4
    tensor_parallel_shards: int = 1
    max_batch_size: int = 1
    layer_sliding_window_sizes: list[int] | None = None
    tie_word_embeddings: bool = False
    num_local_experts: int = 0  # 0: a dense MLP; else Mixtral's experts in every layer
    num_experts_per_tok: int = 0  # experts each token is routed to (0 when dense)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kwargs = dict(self.kwargs or {})
        self._check_types()
        self._settle_activation()
        self._settle_rope()
        self._settle_heads()
        self._settle_windows()
        self._settle_context()
        self._settle_sinks()
        self._settle_prefill_chunk()
        self._settle_experts()
        self._check_sizes()

    # ---------------------------------------------------------------- normalization steps
    def _check_types(self) -> None:
        for key, value in self.kwargs.items():  # the leftovers are written out too
            if not _finite(value):
                raise ConfigError(key, f"holds a NaN or infinite number ({value!r})")
        for name in _REQUIRED_INTS:
            value = getattr(self, name)
            if value is None:
                raise ConfigError(name, "is required but missing or null")
            if not _is_int(value):
                raise ConfigError(name, f"must be an integer, got {value!r} ({_type_name(value)})")
            if abs(value) >= _MAX_INT:
                raise ConfigError(name, f"is {value}: larger than any model")
        for name, default in _OPTIONAL_INTS.items():
            value = getattr(self, name)
            if value is None:
                setattr(self, name, default)
            elif not _is_int(value):
                raise ConfigError(name, f"must be an integer, got {value!r} ({_type_name(value)})")
            elif (value == 0 and name != "attention_sink_size") or abs(value) >= _MAX_INT:
                raise ConfigError(name, f"is {value}: give a positive value, or leave the key "
                                  "out (or null) to have it derived")
        if self.rms_norm_eps is None:
            raise ConfigError("rms_norm_eps", "is required but missing or null")
        if not isinstance(self.rms_norm_eps, (int, float)) or isinstance(self.rms_norm_eps, bool):
            raise ConfigError("rms_norm_eps", f"must be a number, got {self.rms_norm_eps!r}")
        if not math.isfinite(self.rms_norm_eps):
            raise ConfigError("rms_norm_eps", f"must be finite, got {self.rms_norm_eps!r}")
        self.rms_norm_eps = float(self.rms_norm_eps)
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = False
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError("tie_word_embeddings",
                              f"must be true or false, got {self.tie_word_embeddings!r}")

    def _settle_activation(self) -> None:
        act = self.kwargs.pop("hidden_act", None)
        if act not in (None, "silu"):
            raise ConfigError("hidden_act", f"{act!r} is not supported (Mistral uses 'silu')")

    def _settle_rope(self) -> None:
        scaling = self.kwargs.pop("rope_scaling", None)
        params = self.kwargs.pop("rope_parameters", None)
        yarn = self.kwargs.pop("yarn", None)
        theta = self.kwargs.pop("rope_theta", None)
        for key, spec in (("rope_scaling", scaling), ("rope_parameters", params)):
            if spec is None:
                continue
            if not isinstance(spec, dict):
                raise ConfigError(key, f"must be an object, got {spec!r}")
            kind = spec.get("rope_type", spec.get("type"))
            if kind not in _ROPE_TYPES_SUPPORTED:
                raise ConfigError(key, f"RoPE scaling type {kind!r} is not supported yet")
            if theta is None and spec.get("rope_theta") is not None:
                theta = spec["rope_theta"]
                logger.info("position_embedding_base = %s (from rope_parameters.rope_theta)", theta)
        if yarn is not None:
            raise ConfigError("yarn", "YaRN RoPE scaling is not supported yet")
        if self.position_embedding_base is None:
            if theta is None:
                theta = DEFAULT_ROPE_THETA
                logger.info("position_embedding_base = %s (no rope_theta in the config: "
                            "default)", theta)
            self.position_embedding_base = theta
        base = self.position_embedding_base
        if (not isinstance(base, (int, float)) or isinstance(base, bool) or not base > 0
                or not math.isfinite(base)):
            raise ConfigError("rope_theta", f"must be a positive finite number, got {base!r}")
        self.position_embedding_base = float(base)

    def _settle_heads(self) -> None:
        for name in ("hidden_size", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("head_dim", f"is not given and hidden_size={self.hidden_size} "
                                  f"is not divisible by num_attention_heads="
                                  f"{self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
            logger.info("head_dim = %d (absent or null: hidden_size // num_attention_heads)",
                        self.head_dim)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
            logger.info("num_key_value_heads = %d (absent or null: num_attention_heads, no GQA)",
                        self.num_key_value_heads)

    def _source_layer_windows(self) -> list[int]:
        """One window per layer as the source config describes it (-1 = full attention)."""
        n = self.num_hidden_layers
        if n <= 0:
            raise ConfigError("num_hidden_layers", f"must be positive, got {n}")
        raw = self.kwargs.pop("sliding_window", None)
        layer_types = self.kwargs.pop("layer_types", None)
        if isinstance(raw, list):
            pattern = [_window_value("sliding_window", w) for w in raw]
            if len(pattern) == n:
                return pattern
            if pattern and n % len(pattern) == 0:
                logger.info("layer windows: the %d-entry sliding_window list repeats %d times "
                            "over %d layers", len(pattern), n // len(pattern), n)
                return pattern * (n // len(pattern))
            raise ConfigError("sliding_window", f"has {len(pattern)} entries for {n} layers "
                              "(must equal num_hidden_layers or divide it)")
        window = _window_value("sliding_window", raw)
        if layer_types is None:
            return [window] * n
        if not isinstance(layer_types, list) or len(layer_types) != n:
            got = len(layer_types) if isinstance(layer_types, list) else repr(layer_types)
            raise ConfigError("layer_types", f"must list one type per layer ({n}), got {got}")
        windows = []
        for kind in layer_types:
            if kind == "full_attention":
                windows.append(FULL_ATTENTION)
            elif kind == "sliding_attention":
                if window == FULL_ATTENTION:
                    raise ConfigError("sliding_window", "is null but layer_types has "
                                      "'sliding_attention' layers")
                windows.append(window)
            else:
                raise ConfigError("layer_types", f"unknown layer type {kind!r} (expected "
                                  "'sliding_attention' or 'full_attention')")
        return windows

    def _settle_windows(self) -> None:
        n = self.num_hidden_layers
        requested = self.sliding_window_size
        if requested not in (None, FULL_ATTENTION) and requested <= 0:
            raise ConfigError("sliding_window_size", f"must be positive or -1, got {requested}")
        if self.layer_sliding_window_sizes is not None:  # explicit, e.g. our normalized file
            layers = self.layer_sliding_window_sizes
            if not isinstance(layers, list) or len(layers) != n:
                got = len(layers) if isinstance(layers, list) else repr(layers)
                raise ConfigError("layer_sliding_window_sizes",
                                  f"must have one entry per layer ({n}), got {got}")
            layers = [_window_value("layer_sliding_window_sizes", w) for w in layers]
            expected = max(layers)
            if requested not in (None, expected):
                raise ConfigError("sliding_window_size", f"is {requested} but the per-layer "
                                  f"windows say {expected} (largest window, -1 for none)")
        else:
            layers = self._source_layer_windows()
            if requested == FULL_ATTENTION and max(layers) > 0:
                logger.info("sliding window disabled on all layers (sliding_window_size=-1 given)")
                layers = [FULL_ATTENTION] * n
            elif requested is not None and requested > 0:
                windowed = max(layers) > 0
                layers = [requested if (w > 0 or not windowed) else w for w in layers]
                logger.info("sliding window %d applied to %s layers (sliding_window_size given)",
                            requested, "all windowed" if windowed else "all")
            elif requested is None and max(layers) == FULL_ATTENTION:
                logger.info("sliding_window_size = -1 (sliding_window absent, null or -1: "
                            "full attention)")
        self.layer_sliding_window_sizes = layers
        self.sliding_window_size = max(layers)

    def _settle_context(self) -> None:
        all_windowed = min(self.layer_sliding_window_sizes) > 0
        if self.context_window_size is None:
            if all_windowed:
                self.context_window_size = -1
                logger.info("context_window_size = -1 (unbounded: every layer has a sliding "
                            "window)")
            else:
                for key in _CONTEXT_KEYS:
                    value = self.kwargs.get(key)
                    if value is not None:
                        if not _is_int(value) or value <= 0:
                            raise ConfigError(key, f"must be a positive integer, got {value!r}")
                        self.context_window_size = self.kwargs.pop(key)
                        logger.info("context_window_size = %d (from %s)", value, key)
                        break
                else:
                    raise ConfigError("context_window_size", "cannot be derived: the model has "
                                      "full-attention layers and the config has no "
                                      "max_position_embeddings, max_sequence_length or "
                                      "max_seq_len; give it explicitly (--context-window-size)")
        elif self.context_window_size == -1:
            if not all_windowed:
                raise ConfigError("context_window_size", "is -1 (unbounded) but some layers use "
                                  "full attention, whose cache would grow without limit")
        elif self.context_window_size <= 0:
            raise ConfigError("context_window_size",
                              f"must be positive or -1, got {self.context_window_size}")

    def _settle_sinks(self) -> None:
        sink = self.attention_sink_size
        if sink < 0:
            raise ConfigError("attention_sink_size", f"must be >= 0, got {sink}")
        if self.sliding_window_size == FULL_ATTENTION:
            if sink:
                logger.info("attention_sink_size = 0 (was %d: sinks only apply with a sliding "
                            "window)", sink)
            self.attention_sink_size = 0
            return
        if min(self.layer_sliding_window_sizes) == FULL_ATTENTION:
            if sink:
                logger.info("attention_sink_size = 0 (was %d: sinks only apply when every layer "
                            "has a sliding window)", sink)
            self.attention_sink_size = 0
            return
        smallest = min(self.layer_sliding_window_sizes)
        if sink >= smallest - 1:  # the cache keeps the sinks and the W - 1 - sink latest tokens
            raise ConfigError("attention_sink_size", f"is {sink} but must be smaller than the "
                              f"sliding window minus one ({smallest - 1})")

    def _settle_prefill_chunk(self) -> None:
        if self.prefill_chunk_size is not None:
            return
        candidates = [MAX_DEFAULT_PREFILL_CHUNK]
        for value in (self.sliding_window_size, self.context_window_size):
            if value > 0:
                candidates.append(value)
        self.prefill_chunk_size = min(candidates)
        logger.info("prefill_chunk_size = %d (min of sliding window, context window and %d)",
                    self.prefill_chunk_size, MAX_DEFAULT_PREFILL_CHUNK)

    def _settle_experts(self) -> None:
        # router_jitter_noise, router_aux_loss_coef and output_router_logits are training
        # knobs: they stay in kwargs, unread (inference routes without noise, as transformers)
        for name in ("num_local_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if value is None:
                raise ConfigError(name, "is null: give the number, or leave the key out of a "
                                  "dense model's config")
            if not _is_int(value) or value < 0 or value >= _MAX_INT:
                raise ConfigError(name, f"must be a non-negative integer, got {value!r}")
        experts, chosen = self.num_local_experts, self.num_experts_per_tok
        if experts == 0 and chosen:
            raise ConfigError("num_experts_per_tok", f"is {chosen}, but the model has no experts "
                              "(num_local_experts is 0 or missing)")
        if experts and not 1 <= chosen <= experts:
            raise ConfigError("num_experts_per_tok", f"is {chosen}: must be between 1 and "
                              f"num_local_experts={experts}")

    def _check_sizes(self) -> None:
        for name in ("intermediate_size", "vocab_size", "head_dim", "num_key_value_heads",
                     "prefill_chunk_size", "tensor_parallel_shards", "max_batch_size"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(name, f"must be positive, got {value}")
        if self.rms_norm_eps <= 0:
            raise ConfigError("rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.num_key_value_heads % self.tensor_parallel_shards:
            raise ConfigError("tensor_parallel_shards", f"{self.tensor_parallel_shards} does not "
                              f"divide num_key_value_heads={self.num_key_value_heads}")

    # ---------------------------------------------------------------- readers
    @classmethod
    def from_hf(cls, data: dict[str, Any],
                overrides: dict[str, Any] | None = None) -> MistralConfig:
        """From a Hugging Face ``config.json`` dict; see ``readers.from_hf``."""
        from mistral_compile.config.readers import from_hf

        return from_hf(data, overrides)

    @classmethod
    def from_mistral_params(cls, data: dict[str, Any],
                            overrides: dict[str, Any] | None = None) -> MistralConfig:
        """From a Mistral-native ``params.json`` dict; see ``readers.from_mistral_params``."""
        from mistral_compile.config.readers import from_mistral_params

        return from_mistral_params(data, overrides)

    # ---------------------------------------------------------------- derived views
    @property
    def uses_sliding_window(self) -> bool:
        """True when at least one layer has a sliding window."""
        return self.sliding_window_size > 0

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts model (Mixtral): experts in place of the dense MLP."""
        return self.num_local_experts > 0

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-able data."""
        return dataclasses.asdict(self)

    def with_shards(self, shards: int) -> MistralConfig:
        """The config as a library of ``shards`` tensor-parallel shards runs it (validated)."""
        if shards == self.tensor_parallel_shards:
            return self
        return dataclasses.replace(self, tensor_parallel_shards=shards, kwargs=dict(self.kwargs))

    def fingerprint(self) -> str:
        """sha256 of every shape-relevant field (not ``kwargs``): ties libraries to configs."""
        data = self.to_dict()
        data.pop("kwargs")
        # the shard count is the library's (compile --tensor-parallel-shards): weights converted
        # once serve every count, and unsharded configs keep the fingerprints they had
        data["tensor_parallel_shards"] = 1
        if not self.is_moe:  # dense configs keep the fingerprints they had before experts
            data.pop("num_local_experts")
            data.pop("num_experts_per_tok")
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def summary(self) -> str:
        """A few lines describing the derived values, for people."""
        windows = self.layer_sliding_window_sizes
        kinds: dict[int, int] = {}
        for w in windows:
            kinds[w] = kinds.get(w, 0) + 1
        per_layer = ", ".join(f"{count}x {'full' if w == -1 else w}" for w, count in kinds.items())
        return "\n".join([
            f"layers            {self.num_hidden_layers} (hidden {self.hidden_size}, "
            f"intermediate {self.intermediate_size}, vocab {self.vocab_size})",
            f"heads             {self.num_attention_heads} query / {self.num_key_value_heads} kv, "
            f"head_dim {self.head_dim}",
            f"rope theta        {self.position_embedding_base:g}",
            f"sliding window    {self.sliding_window_size} (per layer: {per_layer})",
            f"attention sinks   {self.attention_sink_size}",
            f"context window    {self.context_window_size}"
            + (" (unbounded)" if self.context_window_size == -1 else ""),
            f"prefill chunk     {self.prefill_chunk_size}",
            f"max batch size    {self.max_batch_size}",
        ] + ([f"experts           {self.num_local_experts} per layer, "
              f"{self.num_experts_per_tok} per token"] if self.is_moe else []))


def _window_value(key: str, value: Any) -> int:
    """A window entry: positive int, or null/-1 for full attention."""
    if value is None or value == FULL_ATTENTION:
        return FULL_ATTENTION
    if not _is_int(value) or value <= 0:
        raise ConfigError(key, f"window entries must be positive integers, -1 or null, "
                          f"got {value!r}")
    return value
