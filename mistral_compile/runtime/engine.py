"""Engine: runs a compiled library with converted weights, prefill and decode on one sequence."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tvm

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.artifact import Artifact
from mistral_compile.runtime.library import (
    STATE_PREFIX,
    TokenReader,
)
from mistral_compile.runtime.sampler import Sampler, SamplingState
from mistral_compile.runtime.sampling import SamplingParams, sample
from mistral_compile.runtime.textgen import TextStream, Turn, chat_prompt, message_pairs
from mistral_compile.tokenizer import Tokenizer

logger = logging.getLogger("mistral_compile.runtime")

PAGE_SIZE = 16  # TVM 0.27's CPU attention kernels are generated for 16-token pages
SEQ_ID = 0


@functools.cache
def _builtin(name: str):  # noqa: ANN202
    return tvm.get_global_func(f"vm.builtin.{name}")


def _shape(*values: int) -> tvm.runtime.ShapeTuple:
    return tvm.runtime.ShapeTuple(list(values))


class Engine:
    """One sequence, greedy or driven token by token; logits come back as float32 numpy.

    Without attention sinks the engine uses the model-owned KV cache (model/kv_owned.py): keys
    at absolute positions, query i sees key j iff 0 <= i - j < W (or j <= i without a window),
    so results equal Hugging Face's at any length; with a window it is a ring of W - 1 + chunk
    slots. With s sinks it uses TVM's paged cache, which keeps the first s tokens and the last
    W-1-s (StreamingLLM); see docs/attention.md. ``kv_cache="paged"`` forces the paged cache.
    """

    def __init__(self, model_dir: str | os.PathLike, lib: str | os.PathLike,
                 device: str = "cpu", attention_sink_size: int | None = None,
                 prefill_chunk_size: int | None = None,
                 params: Mapping[str, Any] | None = None, progress: bool = False,
                 kv_cache: str | None = None, tokenizer: str | None = None,
                 verify: bool = False) -> None:
        """Load ``lib`` with the weights in ``model_dir`` on ``device`` (cpu, cuda, cuda:N).

        ``params`` (name -> array on the device, anything with DLPack, or numpy) replaces the
        weight files: then ``model_dir`` needs only ``mistral-config.json`` (used by benchmarks
        and GPU checks with random weights made on the device). ``tokenizer`` ("mistral-common"
        or "hf") overrides the family recorded at conversion (mistral_compile/tokenizer).
        The weight files are checked against the manifest (sizes; with ``verify``, sha256).
        """
        self.artifact = art = Artifact(model_dir, lib, device, params, progress, verify)
        self.model_dir, self.progress = art.model_dir, progress
        self.config, self.device, self.vm, self.meta = art.config, art.device, art.vm, art.meta
        self.dtype, self.quantization = art.dtype, art.quantization
        self.tokenizer_record = art.tokenizer_record
        self.params, self._state = art.params, art.state
        self._tokenizer = None
        self._sampler: Sampler | None = None  # the device sampler, made on first use
        self._tokenizer_family = tokenizer
        self._last_turn: Turn | None = None
        self.interrupted = threading.Event()  # set (e.g. by SIGINT) to stop after a token
        self.tokens: list[int] = []  # what the KV cache holds, in order (evicted ones included)
        kind, index = art.kind, art.index
        self._kv_length = self._state[STATE_PREFIX + "length"]
        storage = self._state[STATE_PREFIX + "storage"]
        self._kv_slots = int(storage.shape[3])
        logger.info("KV cache: %d slots per layer, %.2f GiB on %s", self._kv_slots,
                    storage.numel() * storage.dtype.itemsize / 2**30, self.device)
        sink = self.config.attention_sink_size if attention_sink_size is None \
            else attention_sink_size
        self.window = self.config.sliding_window_size
        self.per_sequence_window = min(self.config.layer_sliding_window_sizes) > 0
        if self.window > 0 and not 0 <= sink < self.window - 1:
            raise MistralCompileError(f"attention_sink_size={sink}: must be >= 0 and smaller "
                                      f"than the sliding window minus one ({self.window - 1})")
        if sink and not self.per_sequence_window:
            raise MistralCompileError(f"attention_sink_size={sink}: sinks need every layer "
                                      "windowed; use attention_sink_size=0 for this model")
        self.attention_sink_size = sink if self.window > 0 else 0
        if kv_cache not in (None, "owned", "paged"):
            raise MistralCompileError(f"kv_cache={kv_cache!r}: must be 'owned' or 'paged'")
        if kv_cache == "owned" and self.attention_sink_size:
            raise MistralCompileError("kv_cache='owned' has no attention sinks: use "
                                      "kv_cache='paged' or attention_sink_size=0")
        self.kv_cache = kv_cache or ("paged" if self.attention_sink_size else "owned")
        chunk = prefill_chunk_size or self.config.prefill_chunk_size
        # Inside a chunk only the causal mask applies, so a chunk must fit the recent window
        # (W - sink keys); and a chunk of W - sink tokens leaves its last row with no visible
        # cached key, which TVM's state merge turns into NaN. W - 1 - sink avoids both.
        if self.window > 1:
            chunk = min(chunk, self.window - 1 - self.attention_sink_size)
        if self.kv_cache == "owned" and self.per_sequence_window:  # a chunk's rows see W-1 more
            chunk = min(chunk, self._kv_slots - (self.window - 1))
        self.chunk_size = chunk
        # greedy steps on the owned cache overlap the host's work with the GPU's (see greedy)
        self._reader = TokenReader(index) if kind == "cuda" and self.kv_cache == "owned" \
            else None
        # per-step host work, done once: the VM functions, and a device buffer for token ids
        # (a fresh device array each step cost an allocation and a free on the decode path)
        paged = "_paged" if self.kv_cache == "paged" else ""
        self._fn = {name: self.vm[name + paged] for name in ("prefill", "decode")}
        self._fn["embed"] = self.vm["embed"]
        self._ids = tvm.runtime.empty((chunk,), "int32", self.device)
        self._seq, self._one = _shape(SEQ_ID), _shape(1)
        self.cache = None
        self.length = 0
        self.reset()

    def reset(self) -> None:
        """Forget the sequence and the last chat turn: a fresh KV cache."""
        self._new_cache()
        self._last_turn = None

    def _new_cache(self) -> None:
        self.length = 0
        self.tokens = []
        if self.kv_cache == "owned":  # the storage stays; slots past the length are never read
            self._set_device_length()
            return
        cfg = self.config
        if self.per_sequence_window:
            capacity = self.window + self.chunk_size + 2 * PAGE_SIZE
        else:
            capacity = cfg.context_window_size
        capacity = -(-capacity // PAGE_SIZE) * PAGE_SIZE
        self.cache = self.vm["create_paged_kv_cache"](
            _shape(1), _shape(capacity), _shape(self.chunk_size), _shape(PAGE_SIZE),
            _shape(1 if self.per_sequence_window else 0))
        _builtin("kv_state_add_sequence")(self.cache, SEQ_ID)
        if self.per_sequence_window:
            _builtin("attention_kv_cache_enable_sliding_window_for_seq")(
                self.cache, SEQ_ID, self.window - 1, self.attention_sink_size)

    def _set_device_length(self) -> None:
        """The owned cache's length on the device := ``self.length`` (decode steps add one)."""
        self._kv_length.copyfrom(np.array([self.length], dtype="int32"))
        self._device_length = self.length

    def _check_tokens(self, token_ids: list[int]) -> None:
        vocab = self.config.vocab_size
        for t in token_ids:
            if not 0 <= int(t) < vocab:
                raise MistralCompileError(f"token id {t} is outside the vocabulary [0, {vocab})")
        limit = self.config.context_window_size
        if limit > 0 and self.length + len(token_ids) > limit:
            raise MistralCompileError(f"sequence of {self.length + len(token_ids)} tokens exceeds "
                                      f"the context window ({limit})")

    def _upload(self, token_ids: list[int]) -> tvm.runtime.Tensor:
        """The ids in the device buffer made once (at most chunk_size of them)."""
        ids = self._ids._create_view((len(token_ids),))
        ids.copyfrom(np.asarray(token_ids, dtype="int32"))
        return ids

    def _forward(self, token_ids: list[int]) -> np.ndarray:
        n = len(token_ids)  # at most chunk_size
        embed = self._fn["embed"](self._upload(token_ids), self.params)  # [n, hidden], on GPU
        embed = embed._create_view((1, n, int(embed.shape[-1])))
        if self.kv_cache == "owned":
            if self._device_length != self.length:
                self._set_device_length()
            out = self._fn["prefill"](embed, self.params)
        else:
            _builtin("kv_state_begin_forward")(self.cache, self._seq, _shape(n))
            out = self._fn["prefill"](embed, self.cache, self.params)[0]
            _builtin("kv_state_end_forward")(self.cache)
        self._appended(token_ids)
        return out.numpy().reshape(-1)

    def _appended(self, token_ids: list[int]) -> None:
        self.length += len(token_ids)
        self.tokens.extend(int(t) for t in token_ids)

    def _decode_step(self, ids: tvm.runtime.Tensor, token_id: int) -> tuple:
        """Run ``decode`` on the id already in ``ids`` (device): (logits, argmax), on the device."""
        if self.kv_cache == "owned":
            logits, best = self._launch(ids)
        else:
            _builtin("kv_state_begin_forward")(self.cache, self._seq, self._one)
            logits, best = self._fn["decode"](ids, self.cache, self.params)[:2]
            _builtin("kv_state_end_forward")(self.cache)
        self._appended([token_id])
        return logits, best

    def _launch(self, ids: tvm.runtime.Tensor) -> tuple:
        """Queue an owned-cache ``decode`` of the id in ``ids``; the host's length is unchanged.

        The step's last kernel adds one to the device's length, and so does ``_device_length``.
        """
        if self._device_length != self.length:
            self._set_device_length()
        logits, best = self._fn["decode"](ids, self.params)
        self._device_length += 1
        return logits, best

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        """Append a prompt (split into chunks); logits of its last token."""
        if not token_ids:
            raise MistralCompileError("prefill needs at least one token")
        self._check_tokens(token_ids)
        logits, start = None, 0
        for size in self.prefill_chunks(len(token_ids)):
            logits = self._forward(list(token_ids[start:start + size]))
            start += size
        return logits

    def prefill_chunks(self, n: int) -> list[int]:
        """Chunk sizes in which ``prefill`` would feed ``n`` more tokens at this point."""
        sizes, length = [], self.length
        while n > 0:
            size = min(self.chunk_size, n)
            if self.attention_sink_size and length < self.window:
                # The first forward that evicts still sees the cache without its sinks marked
                # (TVM slides after building the attention views), so no chunk may cross the
                # window's first W tokens: then every row's view is the one the mask expects.
                size = min(size, self.window - length)
            sizes.append(size)
            length, n = length + size, n - size
        return sizes

    def decode(self, token_id: int) -> np.ndarray:
        """Append one token; its logits."""
        self._check_tokens([token_id])
        return self._decode_step(self._upload([token_id]), int(token_id))[0].numpy().reshape(-1)

    def greedy(self, token_id: int) -> Iterator[int]:
        """Decode greedily from ``token_id``: yields the argmax after it, then after that, ...

        Each step's argmax is computed on the device and fed to the next step where it lies, so
        the logits never leave the GPU and no id is uploaded: the host reads back one int32 per
        step, which is also the step's synchronisation. A step runs when the next token is asked
        for: the cache holds every token fed so far, and the last one yielded joins it only when
        the generator is advanced again.

        On the owned cache (CUDA) the step after the one being read is queued first, where the
        context has room for it, so the GPU does not wait for the host between steps. If the
        generator is dropped, that step's token is not in the cache (``length``, ``tokens``):
        the device's length is reset by the next forward, which overwrites its slot.
        """
        self._check_tokens([token_id])
        ids = self._upload([token_id])
        if self._reader is not None:
            yield from self._greedy_ahead(ids, token_id)
            return
        while True:
            _, ids = self._decode_step(ids, token_id)
            token_id = int(ids.numpy()[0])
            yield token_id
            self._check_tokens([token_id])  # the context limit, before the next step

    def _greedy_ahead(self, ids: tvm.runtime.Tensor, token_id: int) -> Iterator[int]:
        """``greedy`` with the next step queued before this one's token is read."""
        limit = self.config.context_window_size
        reader, slot = self._reader, 0
        _, best = self._launch(ids)
        self._appended([token_id])
        reader.start(slot, best)
        while True:
            ahead = None  # the step fed with `best`'s token, queued before that token is read
            if limit <= 0 or self.length + 1 <= limit:
                _, ahead = self._launch(best)
                reader.start(1 - slot, ahead)
            token_id = reader.result(slot)
            yield token_id
            self._check_tokens([token_id])  # the context limit (then nothing was queued)
            self._appended([token_id])
            best, slot = ahead, 1 - slot

    def continue_from(self, logits: np.ndarray, params: SamplingParams,
                      rng: np.random.Generator | None, prompt: list[int]) -> Iterator[int]:
        """The tokens after a prefill whose last logits are ``logits``, one per ``next``.

        Each later token costs a decode step, run when it is asked for. Greedy sampling goes
        through ``greedy`` (the argmax on the device). Otherwise the library's ``sample`` picks
        each token on the device (runtime/sampler.py): only the token id comes back. Its noise
        is keyed by (seed, index of the token in the answer), the seed being ``params.seed`` or
        one drawn from ``rng``; the repetition penalty sees ``prompt`` and the tokens so far.
        """
        if params.greedy:
            token = sample(logits, params, rng, list(prompt))
            yield token
            yield from self.greedy(token)
            return
        if self._sampler is None:
            self._sampler = Sampler(self.artifact)
        seed = params.seed if params.seed is not None else \
            int((rng or np.random.default_rng()).integers(2**32))
        state = SamplingState(params, seed % 2**32, list(prompt), [])
        vocab = self.config.vocab_size
        rows = tvm.runtime.tensor(np.asarray(logits, dtype="float32").reshape(1, vocab),
                                  self.device)
        while True:
            token = int(self._sampler.sample(rows, [state])[0][0])
            yield token
            self._check_tokens([token])
            state.output.append(token)
            rows = self._decode_step(self._upload([token]), token)[0]._create_view((1, vocab))

    @property
    def capacity(self) -> int:
        """Token slots one sequence may hold in the cache (its memory bound)."""
        if self.kv_cache == "owned":
            return self._kv_slots
        if self.per_sequence_window:
            return self.window - 1 + self.chunk_size
        return self.config.context_window_size

    def context_full(self) -> bool:
        """True when a model without a window cannot take another token."""
        limit = self.config.context_window_size
        return not self.per_sequence_window and limit > 0 and self.length >= limit

    def rollback(self, n: int) -> bool:
        """Drop the last ``n`` tokens from the cache if it still holds them all (no eviction)."""
        if n == 0:
            return True
        if self.kv_cache == "owned":
            # ring: the window before the new end must not have been overwritten by the n
            # tokens dropped, nor by a step greedy queued ahead (position p is in slot p % slots)
            if self.per_sequence_window and n > self._kv_slots - self.window:
                return False
        elif self.per_sequence_window and self.length > self.window - 1:
            return False  # the window has slid: TVM cannot pop across evicted pages
        else:
            _builtin("kv_state_popn")(self.cache, SEQ_ID, n)
        self.length -= n
        del self.tokens[-n:]
        return True

    def reuse_prefix(self, prompt: list[int]) -> list[int]:
        """Keep the cached tokens ``prompt`` starts with (rolling back the rest); the new ones.

        When the cache cannot roll back (its window slid) the sequence starts over.
        """
        common = 0
        for a, b in zip(self.tokens, prompt, strict=False):
            if a != b:
                break
            common += 1
        if common == len(prompt):  # something must be prefilled to get logits
            common -= 1
        if not self.rollback(len(self.tokens) - common):
            self._new_cache()
            common = 0
        return list(prompt[common:])

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, mistral-common or Hugging Face (loaded on first use)."""
        if self._tokenizer is None:
            from mistral_compile.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir, self.tokenizer_record,
                                             self.config.vocab_size, self._tokenizer_family)
        return self._tokenizer

    def chat(self, messages: list[Any], tools: list[dict] | None = None,
             **options: Any) -> TextStream:
        """Stream the assistant's answer to a conversation (dicts with role/content).

        Options are SamplingParams fields (temperature, top_p, top_k, repetition_penalty,
        max_tokens, seed, stop); ``tools`` (JSON schemas) go to the chat template. The KV cache
        keeps what the conversation shares with the previous call, so a follow-up turn prefills
        only its new tokens. ``stream.usage`` after the end.
        """
        params = SamplingParams(**options)
        prompt = chat_prompt(self.tokenizer, messages, self._last_turn, tools)
        stream = TextStream(self, prompt, params)
        self._last_turn = Turn(message_pairs(messages), prompt, stream, tools)
        return stream

    def generate(self, prompt: list[int] | str, max_new_tokens: int | None = None,
                 **options: Any) -> list[int] | TextStream:
        """Continue a prompt from an empty cache.

        Token ids in (``list[int]``): the generated ids come back as a list (greedy unless
        sampling options are given; no EOS handling). Text in (``str``, no chat template): a
        TextStream of text pieces that ends at EOS, a stop string or ``max_new_tokens``.
        """
        params = SamplingParams(max_tokens=max_new_tokens, **options)
        self.reset()
        if isinstance(prompt, str):
            return TextStream(self, self.tokenizer.encode(prompt), params)
        if max_new_tokens is None:
            raise MistralCompileError("generate(token_ids, max_new_tokens): max_new_tokens "
                                      "is required with token ids")
        rng = np.random.default_rng(params.seed)
        steps = self.continue_from(self.prefill(list(prompt)), params, rng, list(prompt))
        return [next(steps) for _ in range(max_new_tokens)]
