"""Tensor parallelism as data: how each weight is cut over the shards, and the model mutator.

Megatron's split, as vLLM and MLC LLM shard Mistral: a shard holds whole heads.
- The fused ``qkv_proj`` and ``gate_up_proj`` are cut along their output rows, each segment
  (q, k, v; gate, up) alike, so shard r holds its heads' q, k and v rows and its slice of the
  MLP's gate and up rows.
- ``o_proj`` and ``down_proj`` are cut along their input columns. Each shard's product is a
  partial sum, added over the shards by an all-reduce before the residual add.
- Embeddings, norms and ``lm_head`` are replicated, so every shard ends with the same logits.
  Cutting the vocabulary would save lm_head's memory at the price of an all-gather per step.

A shard's model is the model of ``local_config`` (its heads, KV heads and MLP width), with
``TensorParallel`` applied: the all-reduce is ``ALLREDUCE``, a packed function the runtime
registers in each shard's process (runtime/parallel.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from mistral_compile.config import MistralConfig
from mistral_compile.errors import ConfigError
from mistral_compile.model.mistral import MistralLinear

ALLREDUCE = "mistral_compile.tp_allreduce"  # (x, out): out = the sum of x over the shards


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


def check_shardable(config: MistralConfig, quantization: str | None) -> None:
    """Refuse, naming the field, what the shards cannot hold yet."""
    shards = config.tensor_parallel_shards
    if config.is_moe:
        raise ConfigError("tensor_parallel_shards", f"is {shards}: mixtures of experts are not "
                          "sharded yet")
    if quantization not in (None, "q0f32", "q0f16"):
        raise ConfigError("tensor_parallel_shards", f"is {shards}: {quantization} weights are "
                          "not sharded yet (q0f32 and q0f16 are)")
    if config.intermediate_size % shards:
        raise ConfigError("tensor_parallel_shards", f"{shards} does not divide "
                          f"intermediate_size={config.intermediate_size}")


def local_config(config: MistralConfig) -> MistralConfig:
    """What one of ``config.tensor_parallel_shards`` shards holds: its heads and MLP width."""
    n = config.tensor_parallel_shards
    return dataclasses.replace(
        config, num_attention_heads=config.num_attention_heads // n,
        num_key_value_heads=config.num_key_value_heads // n,
        intermediate_size=config.intermediate_size // n, tensor_parallel_shards=1,
        kwargs=dict(config.kwargs))


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


class RowParallelLinear(MistralLinear):
    """A projection over this shard's input columns: its partial sums all-reduced, then added.

    No epilogue is fused: the residual must be added once, after the sum over the shards.
    """

    @classmethod
    def of(cls, linear: MistralLinear) -> RowParallelLinear:
        """The same projection (its parameters and their names) with the all-reduce."""
        new = cls.__new__(cls)
        new.__dict__.update(linear.__dict__)
        return new

    def add_to(self, x: Tensor, residual: Tensor) -> Tensor:
        y = self(x)
        return residual + op.extern(ALLREDUCE, [y], out=Tensor.placeholder(y.shape, y.dtype))

    def takes_fused_decode(self, dtype: str) -> bool:  # noqa: D102 (no fused residual GEMV)
        return False


class TensorParallel(nn.Mutator):
    """Give a shard's model (built from ``local_config``) its all-reduces after o and down."""

    def visit_module(self, name: str, node: nn.Module) -> Any:
        for attr in ("o_proj", "down_proj"):
            linear = getattr(node, attr, None)
            if isinstance(linear, MistralLinear) and not isinstance(linear, RowParallelLinear):
                setattr(node, attr, RowParallelLinear.of(linear))
        return super().visit_module(name, node)
