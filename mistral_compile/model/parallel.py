"""Tensor parallelism applied to the model: a shard's config and the all-reduce mutator.

A shard holds whole heads and a slice of the MLP (the cut of the weights is data:
weights/shard.py). Each shard's o_proj and down_proj products are partial sums, added over the
shards by an all-reduce before the residual add; embeddings, norms and ``lm_head`` are
replicated, so every shard ends with the same logits. **Chosen:** replicate ``lm_head``.
Cutting the vocabulary would save its memory at the price of an all-gather per step.

The cut of the weights is data (weights/shard.py). A shard's model is the model of
``local_config`` (its heads, KV heads and MLP width) with ``TensorParallel`` applied: the
all-reduce is ``abi.ALLREDUCE``, a packed function the runtime registers in each shard's process
(runtime/parallel.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from mistral_compile.abi import ALLREDUCE
from mistral_compile.config import MistralConfig
from mistral_compile.errors import ConfigError
from mistral_compile.model.mistral import MistralLinear
from mistral_compile.weights.quantize import GROUP


def check_shardable(config: MistralConfig, quantization: str | None) -> None:
    """Refuse, naming the field, what the shards cannot hold yet."""
    shards = config.tensor_parallel_shards
    if config.is_moe:
        raise ConfigError("tensor_parallel_shards", f"is {shards}: mixtures of experts are not "
                          "sharded yet")
    if config.intermediate_size % shards:
        raise ConfigError("tensor_parallel_shards", f"{shards} does not divide "
                          f"intermediate_size={config.intermediate_size}")
    if quantization and quantization.startswith("q4"):  # o and down cut whole groups of 32
        for proj, width in (("o_proj", config.num_attention_heads * config.head_dim),
                            ("down_proj", config.intermediate_size)):
            if (width // shards) % GROUP:
                raise ConfigError("tensor_parallel_shards", f"is {shards}: a shard's {proj} "
                                  f"would take {width // shards} input columns, not whole "
                                  f"{quantization} groups of {GROUP}")


def local_config(config: MistralConfig) -> MistralConfig:
    """What one of ``config.tensor_parallel_shards`` shards holds: its heads and MLP width."""
    n = config.tensor_parallel_shards
    return dataclasses.replace(
        config, num_attention_heads=config.num_attention_heads // n,
        num_key_value_heads=config.num_key_value_heads // n,
        intermediate_size=config.intermediate_size // n, tensor_parallel_shards=1,
        kwargs=dict(config.kwargs))


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
