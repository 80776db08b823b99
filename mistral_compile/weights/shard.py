"""The tensor-parallel cut of each weight, as data, and a shard's part of the weights.

Megatron's split, as vLLM and MLC LLM shard Mistral (model/parallel.py builds the matching
model): ``qkv_proj`` and ``gate_up_proj`` are cut along their output rows, each fused segment
(q, k, v; gate, up) alike, so a shard holds whole heads; ``o_proj`` and ``down_proj`` along their
input columns; everything else is replicated. numpy only: the runtime cuts weights at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mistral_compile.config import MistralConfig


@dataclass(frozen=True)
class Split:
    """How one weight is cut: along ``dim`` (0 rows, 1 columns), each segment alike."""

    dim: int
    segments: tuple[int, ...] = ()  # the global sizes of fused parts along ``dim``; () one part


def shard_plan(config: MistralConfig) -> dict[str, Split]:
    """The cut of every sharded weight, by the name's last two parts; the rest is replicated."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    i = config.intermediate_size
    return {"qkv_proj.weight": Split(0, (q, kv, kv)), "o_proj.weight": Split(1),
            "gate_up_proj.weight": Split(0, (i, i)), "down_proj.weight": Split(1)}


def shard_weight(name: str, weight: np.ndarray, plan: Mapping[str, Split], shards: int,
                 rank: int) -> np.ndarray:
    """Shard ``rank``'s part of the weight ``name`` (Hugging Face's [out, in] layout)."""
    split = plan.get(".".join(name.split(".")[-2:]))
    if split is None or shards == 1:
        return weight
    segments = split.segments or (weight.shape[split.dim],)
    parts, start = [], 0
    for size in segments:
        part = size // shards
        lo = start + rank * part
        parts.append(weight[lo:lo + part] if split.dim == 0 else weight[:, lo:lo + part])
        start += size
    return np.ascontiguousarray(np.concatenate(parts, axis=split.dim))


def shard_params(params: Mapping[str, np.ndarray], config: MistralConfig,
                 rank: int) -> dict[str, np.ndarray]:
    """Every weight of ``params`` (the whole model's) as shard ``rank`` holds it."""
    plan = shard_plan(config)
    return {name: shard_weight(name, w, plan, config.tensor_parallel_shards, rank)
            for name, w in params.items()}
