"""The tensor-parallel cut of each weight, as data, and a shard's part of the weights.

Megatron's split, as vLLM and MLC LLM shard Mistral (model/parallel.py builds the matching
model): ``qkv_proj`` and ``gate_up_proj`` are cut along their output rows, each fused segment
(q, k, v; gate, up) alike, so a shard holds whole heads; ``o_proj`` and ``down_proj`` along their
input columns; everything else is replicated. A projection's 4-bit codes, scales and minimums
(weights/quantize.py: [out, in / 8], [out, in / 32]) are cut as its weight is: rows alike, and
columns in the same share, whole groups of 32 (model/parallel.py checks the widths divide).
numpy only: the runtime cuts weights at load.
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
    """The cut of every sharded projection, by its name (the weight's second-last part).

    It applies to each of the projection's tensors: ``weight``, or ``q_weight``, ``q_scale``
    and ``q_min``. The rest is replicated.
    """
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    i = config.intermediate_size
    return {"qkv_proj": Split(0, (q, kv, kv)), "o_proj": Split(1),
            "gate_up_proj": Split(0, (i, i)), "down_proj": Split(1)}


def shard_weight(name: str, weight: np.ndarray, plan: Mapping[str, Split], shards: int,
                 rank: int) -> np.ndarray:
    """Shard ``rank``'s part of the tensor ``name`` (Hugging Face's [out, in] layout)."""
    parts = name.split(".")
    split = plan.get(parts[-2]) if len(parts) >= 2 else None
    if split is None or shards == 1:
        return weight
    # a fused segment's rows; along the input, the tensor's own width (codes and scales are
    # narrower than the weight by their packing)
    segments = split.segments if split.dim == 0 and split.segments else (weight.shape[split.dim],)
    pieces, start = [], 0
    for size in segments:
        part = size // shards
        lo = start + rank * part
        pieces.append(weight[lo:lo + part] if split.dim == 0 else weight[:, lo:lo + part])
        start += size
    return np.ascontiguousarray(np.concatenate(pieces, axis=split.dim))


def shard_params(params: Mapping[str, np.ndarray], config: MistralConfig,
                 rank: int) -> dict[str, np.ndarray]:
    """Every weight of ``params`` (the whole model's) as shard ``rank`` holds it."""
    plan = shard_plan(config)
    return {name: shard_weight(name, w, plan, config.tensor_parallel_shards, rank)
            for name, w in params.items()}
