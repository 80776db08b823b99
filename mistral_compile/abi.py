"""What a library's batched functions and the runtime agree on (pure Python, no TVM compiler).

The page layout of the KV cache and its window groups (model/kv_paged.py, runtime/kv_cache.py),
the attention sinks' columns, and the sampler's option columns (model/sampler.py,
mc_kernels.cuh OPT_*; a test holds the header equal).
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 16  # tokens per page: the unit of allocation, sharing and freeing

# the sampler's per-row options, columns of a float32 [rows, NUM_OPTIONS] tensor
OPT_TEMPERATURE, OPT_TOP_P, OPT_TOP_K, OPT_MIN_P = 0, 1, 2, 3
OPT_REPETITION, OPT_PRESENCE, OPT_FREQUENCY, NUM_OPTIONS = 4, 5, 6, 7
MAX_TOP_LOGPROBS = 20

# a batched step's attention sinks, columns of an int32 [rows, SINK_COLUMNS] array: count, the
# sinks' page, shift (model/kv_paged.py; mc_kernels.cuh SINK_COLUMNS). Without sinks one column.
SINK_COLUMNS = 3


@dataclass(frozen=True)
class KVGroup:
    """Layers that share a window (0: none), and so a page pool and a page table."""

    window: int
    layers: tuple[int, ...]


def kv_groups(layer_windows: list[int]) -> list[KVGroup]:
    """The window groups of a model (its per-layer windows), in the order of their first layer."""
    order: dict[int, list[int]] = {}
    for layer, window in enumerate(layer_windows):
        order.setdefault(window, []).append(layer)
    return [KVGroup(w, tuple(layers)) for w, layers in order.items()]


def ring_width(window: int, chunk: int, context: int) -> int:
    """Table slots (pages) a sequence needs in a group: the pages its next step can touch.

    A step of up to ``chunk`` tokens after L reads keys from L - W + 1 to L + chunk - 1; those
    pages, plus one for alignment, must sit in distinct slots. Without a window: the context.
    """
    if window <= 0:
        return -(-context // PAGE_SIZE)
    return (window - 1 + chunk - 1) // PAGE_SIZE + 2

# the packed function a tensor-parallel shard's library calls after o_proj and down_proj:
# (x, out), out = the sum of x over the shards (model/parallel.py; runtime/parallel.py binds it)
ALLREDUCE = "mistral_compile.tp_allreduce"
