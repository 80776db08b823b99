"""The batch-1 Engine's KV caches: one interface, the model-owned cache and TVM's paged one (sinks).

The Engine (runtime/engine.py) keeps the sequence (its tokens and length) and asks its cache to
run forwards on it; every difference between the two caches lives here, in one class each:

- ``OwnedCache`` (model/kv_owned.py): keys at absolute positions in a ring the model owns, the
  exact window (query i sees key j iff 0 <= i - j < W), HF-equal at any length. On CUDA its
  decode steps can be queued ahead of the host (the step increments the device's length), so
  greedy decoding overlaps the host's work with the GPU's.
- ``SinkPagedCache``: TVM's paged cache, which keeps the first s tokens (StreamingLLM sinks) and
  the last W - 1 - s; see docs/attention.md.

The batched runtime's cache (pages per sequence, prefix sharing) is runtime/kv_cache.py.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import tvm

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.artifact import Artifact
from mistral_compile.runtime.library import STATE_PREFIX, TokenReader

logger = logging.getLogger("mistral_compile.runtime")

PAGE_SIZE = 16  # TVM's paged cache (not ours, abi.PAGE_SIZE): its CPU kernels take 16
SEQ_ID = 0


@functools.cache
def _builtin(name: str):  # noqa: ANN202
    return tvm.get_global_func(f"vm.builtin.{name}")


def _shape(*values: int) -> tvm.runtime.ShapeTuple:
    return tvm.runtime.ShapeTuple(list(values))


class SequenceCache:
    """What the Engine needs of a KV cache holding one sequence.

    ``length`` arguments are the number of tokens the Engine has fed so far (the position of the
    first new token). ``reader`` is set when decode steps may be queued before the previous
    step's token is read (``Engine.greedy``).
    """

    kind: str
    chunk_size: int
    capacity: int  # token slots one sequence may hold (its memory bound)
    reader: TokenReader | None = None

    def __init__(self, artifact: Artifact, window: int, sink: int) -> None:
        self.artifact, self.config = artifact, artifact.config
        self.window, self.sink = window, sink
        self.per_sequence_window = min(self.config.layer_sliding_window_sizes) > 0

    def _chunk(self, asked: int | None) -> int:
        """The prefill chunk, at most W - 1 - sink.

        Inside a chunk only the causal mask applies, so it must fit the recent window (W - sink
        keys); a chunk of W - sink tokens would leave its last row no visible cached key (NaN in
        TVM's state merge). W - 1 - sink avoids both.
        """
        chunk = asked or self.config.prefill_chunk_size
        if self.window > 1:
            chunk = min(chunk, self.window - 1 - self.sink)
        return chunk

    def reset(self) -> None:
        """Forget every token."""
        raise NotImplementedError

    def prefill(self, embed: tvm.runtime.Tensor, length: int) -> tvm.runtime.Tensor:
        """Append a chunk (``embed`` [1, n, hidden]); logits of its last token, on the device."""
        raise NotImplementedError

    def decode(self, ids: tvm.runtime.Tensor, length: int) -> tuple:
        """Queue the decode of the id in ``ids`` (device): (logits, argmax), on the device."""
        raise NotImplementedError

    def chunk_sizes(self, n: int, length: int) -> list[int]:
        """Chunk sizes in which ``n`` more tokens are prefilled after ``length``.

        With sinks (TVM's paged cache) no chunk crosses the window's first W tokens: the first
        forward that evicts still sees the cache without its sinks marked (TVM slides after
        building the attention views), and then every row's view is the one the mask expects.
        """
        sizes = []
        while n > 0:
            size = min(self.chunk_size, n)
            if self.sink and length < self.window:
                size = min(size, self.window - length)
            sizes.append(size)
            length, n = length + size, n - size
        return sizes

    def rollback(self, n: int, length: int) -> bool:
        """Drop the last ``n`` (> 0) of ``length`` tokens if the cache still holds them all."""
        raise NotImplementedError


class OwnedCache(SequenceCache):
    """The model-owned cache (exact window, no sinks): a ring of W - 1 + chunk slots."""

    kind = "owned"

    def __init__(self, artifact: Artifact, window: int, prefill_chunk_size: int | None) -> None:
        super().__init__(artifact, window, 0)
        state = artifact.state
        self._length = state[STATE_PREFIX + "length"]
        storage = state[STATE_PREFIX + "storage"]
        self.capacity = int(storage.shape[3])
        logger.info("KV cache: %d slots per layer, %.2f GiB on %s", self.capacity,
                    storage.numel() * storage.dtype.itemsize / 2**30, artifact.device)
        chunk = self._chunk(prefill_chunk_size)
        if self.per_sequence_window:  # a chunk's rows see W - 1 more keys in the ring
            chunk = min(chunk, self.capacity - (window - 1))
        self.chunk_size = chunk
        self._prefill, self._decode = artifact.vm["prefill"], artifact.vm["decode"]
        if artifact.kind == "cuda":  # decode steps queued ahead of the host (Engine.greedy)
            self.reader = TokenReader(artifact.index)
        self._device_length = -1

    def reset(self) -> None:
        """The storage stays: slots past the length are never read."""
        self._set_length(0)

    def _set_length(self, length: int) -> None:
        """The device's length := ``length`` (decode steps add one there themselves)."""
        self._length.copyfrom(np.array([length], dtype="int32"))
        self._device_length = length

    def prefill(self, embed: tvm.runtime.Tensor, length: int) -> tvm.runtime.Tensor:
        if self._device_length != length:
            self._set_length(length)
        return self._prefill(embed, self.artifact.params)

    def decode(self, ids: tvm.runtime.Tensor, length: int) -> tuple:
        """Queue a decode step; its last kernel adds one to the device's length.

        The host's copy of that length adds one too, so a step queued ahead of the Engine's own
        count (``Engine.greedy``) finds the length it expects.
        """
        if self._device_length != length:
            self._set_length(length)
        logits, best = self._decode(ids, self.artifact.params)
        self._device_length += 1
        return logits, best

    def rollback(self, n: int, length: int) -> bool:
        # the ring: the window before the new end must not have been overwritten by the n
        # tokens dropped, nor by a step greedy queued ahead (position p is in slot p % slots)
        return not (self.per_sequence_window and n > self.capacity - self.window)


class SinkPagedCache(SequenceCache):
    """TVM's paged cache: StreamingLLM sinks (the first s tokens stay) or forced by the caller."""

    kind = "paged"

    def __init__(self, artifact: Artifact, window: int, sink: int,
                 prefill_chunk_size: int | None) -> None:
        super().__init__(artifact, window, sink)
        self.chunk_size = self._chunk(prefill_chunk_size)
        self.capacity = window - 1 + self.chunk_size if self.per_sequence_window \
            else self.config.context_window_size
        vm = artifact.vm
        self._prefill, self._decode = vm["prefill_paged"], vm["decode_paged"]
        self._create = vm["create_paged_kv_cache"]
        self._seq, self._one = _shape(SEQ_ID), _shape(1)
        self.cache: Any = None

    def reset(self) -> None:
        if self.per_sequence_window:
            capacity = self.window + self.chunk_size + 2 * PAGE_SIZE
        else:
            capacity = self.config.context_window_size
        capacity = -(-capacity // PAGE_SIZE) * PAGE_SIZE
        self.cache = self._create(_shape(1), _shape(capacity), _shape(self.chunk_size),
                                  _shape(PAGE_SIZE), _shape(1 if self.per_sequence_window else 0))
        _builtin("kv_state_add_sequence")(self.cache, SEQ_ID)
        if self.per_sequence_window:
            _builtin("attention_kv_cache_enable_sliding_window_for_seq")(
                self.cache, SEQ_ID, self.window - 1, self.sink)

    def prefill(self, embed: tvm.runtime.Tensor, length: int) -> tvm.runtime.Tensor:
        _builtin("kv_state_begin_forward")(self.cache, self._seq, _shape(int(embed.shape[1])))
        out = self._prefill(embed, self.cache, self.artifact.params)[0]
        _builtin("kv_state_end_forward")(self.cache)
        return out

    def decode(self, ids: tvm.runtime.Tensor, length: int) -> tuple:
        _builtin("kv_state_begin_forward")(self.cache, self._seq, self._one)
        logits, best = self._decode(ids, self.cache, self.artifact.params)[:2]
        _builtin("kv_state_end_forward")(self.cache)
        return logits, best

    def rollback(self, n: int, length: int) -> bool:
        if self.per_sequence_window and length > self.window - 1:
            return False  # the window has slid: TVM cannot pop across evicted pages
        _builtin("kv_state_popn")(self.cache, SEQ_ID, n)
        return True


def open_cache(artifact: Artifact, kv_cache: str | None, attention_sink_size: int | None,
               prefill_chunk_size: int | None) -> SequenceCache:
    """The cache an Engine runs on: owned unless sinks (or ``kv_cache="paged"``) ask for TVM's.

    ``attention_sink_size`` None takes the config's; every bad combination is one clear line.
    """
    cfg = artifact.config
    sink = cfg.attention_sink_size if attention_sink_size is None else attention_sink_size
    window = cfg.sliding_window_size
    if window > 0 and not 0 <= sink < window - 1:
        raise MistralCompileError(f"attention_sink_size={sink}: must be >= 0 and smaller "
                                  f"than the sliding window minus one ({window - 1})")
    if sink and min(cfg.layer_sliding_window_sizes) <= 0:
        raise MistralCompileError(f"attention_sink_size={sink}: sinks need every layer "
                                  "windowed; use attention_sink_size=0 for this model")
    sink = sink if window > 0 else 0
    if kv_cache not in (None, "owned", "paged"):
        raise MistralCompileError(f"kv_cache={kv_cache!r}: must be 'owned' or 'paged'")
    if kv_cache == "owned" and sink:
        raise MistralCompileError("kv_cache='owned' has no attention sinks: use "
                                  "kv_cache='paged' or attention_sink_size=0")
    if (kv_cache or ("paged" if sink else "owned")) == "owned":
        return OwnedCache(artifact, window, prefill_chunk_size)
    return SinkPagedCache(artifact, window, sink, prefill_chunk_size)
