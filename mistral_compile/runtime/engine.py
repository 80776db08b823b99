"""Engine: one sequence over a compiled library (prefill, decode, greedy, sampling, chat)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tvm

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.artifact import Artifact
from mistral_compile.runtime.kv_single import open_cache
from mistral_compile.runtime.parallel import all_reduce_bound
from mistral_compile.runtime.sampler import Sampler, SamplingState
from mistral_compile.runtime.sampling import SamplingParams, sample
from mistral_compile.runtime.shards import run_worker, start_shards
from mistral_compile.runtime.textgen import TextStream, Turn, chat_prompt, message_pairs
from mistral_compile.tokenizer import Tokenizer

logger = logging.getLogger("mistral_compile.runtime")

class Engine:
    """One sequence, greedy or driven token by token; logits come back as float32 numpy.

    A thin client of the runtime's parts: the artifact (runtime/artifact.py), a one-sequence
    KV cache (runtime/kv_single.py: the model-owned cache, exact at any length, or TVM's paged
    cache with StreamingLLM sinks; ``kv_cache="paged"`` forces the latter), the device sampler
    (runtime/sampler.py) and text output (runtime/textgen.py). The Engine keeps the sequence's
    tokens and turns prompts into chunks and steps; the batched runtime is runtime/llm.py.
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
        # a tensor-parallel model: its other shards' processes (runtime/shards.py)
        self._shards, params = start_shards(model_dir, lib, device, params, dict(
            attention_sink_size=attention_sink_size, prefill_chunk_size=prefill_chunk_size,
            kv_cache=kv_cache), serve_shard)
        self.artifact = art = Artifact(model_dir, lib, device, params, progress, verify)
        self.model_dir, self.progress = art.model_dir, progress
        self.config, self.device, self.vm, self.meta = art.config, art.device, art.vm, art.meta
        self.dtype, self.quantization = art.dtype, art.quantization
        self.tokenizer_record = art.tokenizer_record
        self.params = art.params
        self._tokenizer = None
        self._sampler: Sampler | None = None  # the device sampler, made on first use
        self._tokenizer_family = tokenizer
        self._last_turn: Turn | None = None
        self.interrupted = threading.Event()  # set (e.g. by SIGINT) to stop after a token
        self.tokens: list[int] = []  # what the KV cache holds, in order (evicted ones included)
        self.kv = open_cache(art, kv_cache, attention_sink_size, prefill_chunk_size)
        if self._shards is not None or all_reduce_bound():
            # a sharded step goes to every shard with its token id (the host's): none is queued
            # ahead from an id still on the device
            self.kv.reader = None
        self._embed = self.vm["embed"]
        # a device buffer for token ids, made once (a fresh device array each step cost an
        # allocation and a free on the decode path)
        self._ids = tvm.runtime.empty((self.chunk_size,), "int32", self.device)
        self.length = 0
        self.reset()

    def reset(self) -> None:
        """Forget the sequence and the last chat turn: a fresh KV cache."""
        self._new_cache()
        self._last_turn = None

    def _new_cache(self) -> None:
        if self._shards is not None:
            self._shards.send("_new_cache")
        self.length = 0
        self.tokens = []
        self.kv.reset()

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
        if self._shards is not None:  # every shard runs the chunk (they meet in all-reduces)
            self._shards.send("_forward", [int(t) for t in token_ids])
        n = len(token_ids)  # at most chunk_size
        embed = self._embed(self._upload(token_ids), self.params)  # [n, hidden], on the device
        out = self.kv.prefill(embed._create_view((1, n, int(embed.shape[-1]))), self.length)
        self._appended(token_ids)
        return out.numpy().reshape(-1)

    def _appended(self, token_ids: list[int]) -> None:
        self.length += len(token_ids)
        self.tokens.extend(int(t) for t in token_ids)

    def _decode_step(self, ids: tvm.runtime.Tensor, token_id: int) -> tuple:
        """Run ``decode`` on the id already in ``ids`` (device): (logits, argmax), on the device."""
        if self._shards is not None:
            self._shards.send("decode_token", int(token_id))
        out = self.kv.decode(ids, self.length)
        self._appended([token_id])
        return out

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
        return self.kv.chunk_sizes(n, self.length)

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
        if self.kv.reader is not None:
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
        reader, slot = self.kv.reader, 0
        _, best = self._decode_step(ids, token_id)
        reader.start(slot, best)
        while True:
            ahead = None  # the step fed with `best`'s token, queued before that token is read
            if limit <= 0 or self.length + 1 <= limit:
                _, ahead = self.kv.decode(best, self.length)  # best joins the count when read
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
        if self.kv.reader is not None:
            yield from self._sample_ahead(rows, state)
            return
        while True:
            token = int(self._sampler.sample(rows, [state])[0][0])
            yield token
            self._check_tokens([token])
            state.output.append(token)
            rows = self._decode_step(self._upload([token]), token)[0]._create_view((1, vocab))

    def _sample_ahead(self, rows: tvm.runtime.Tensor, state: SamplingState) -> Iterator[int]:
        """``continue_from``'s sampled loop with each decode step queued before its id is read.

        The step takes the drawn id where the sampler left it on the device, so the GPU goes
        from the draw to the step without waiting for the host. The host reads the id (the copy
        is queued before the step) and builds the next draw's inputs, whose penalties see that
        id, while the step runs. As in ``greedy``, a step queued for an id the caller never
        reads is not in the cache: the next forward overwrites its slot.
        """
        limit = self.config.context_window_size
        reader, vocab = self.kv.reader, self.config.vocab_size
        while True:
            ids, _ = self._sampler.launch(rows, [state])
            reader.start(0, ids)
            logits = None
            if limit <= 0 or self.length + 1 <= limit:  # the id joins the count when read
                logits, _ = self.kv.decode(ids, self.length)
            token = reader.result(0)
            yield token
            self._check_tokens([token])  # the context limit (then nothing was queued)
            self._appended([token])
            state.output.append(token)
            rows = logits._create_view((1, vocab))

    @property
    def capacity(self) -> int:
        """Token slots one sequence may hold in the cache (its memory bound)."""
        return self.kv.capacity

    @property
    def kv_cache(self) -> str:
        """"owned" or "paged" (TVM's cache, for sinks)."""
        return self.kv.kind

    @property
    def chunk_size(self) -> int:
        """The prefill chunk, bounded by what the cache and the window allow."""
        return self.kv.chunk_size

    @property
    def window(self) -> int:
        return self.kv.window

    @property
    def attention_sink_size(self) -> int:
        return self.kv.sink

    @property
    def per_sequence_window(self) -> bool:
        return self.kv.per_sequence_window

    def context_full(self) -> bool:
        """True when a model without a window cannot take another token."""
        limit = self.config.context_window_size
        return not self.per_sequence_window and limit > 0 and self.length >= limit

    def close(self) -> None:
        """Stop a tensor-parallel model's other shards (their processes); else nothing."""
        if self._shards is not None:
            self._shards.close()
            self._shards = None

    def rollback(self, n: int) -> bool:
        """Drop the last ``n`` tokens from the cache if it still holds them all (no eviction)."""
        if n == 0:
            return True
        if self._shards is not None:
            self._shards.send("rollback", n)
        if not self.kv.rollback(n, self.length):
            return False
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


def serve_shard(rank: int, shards: int, address: str, model_dir: str, lib: str,
                engine_args: dict[str, Any], pipe: Any) -> None:
    """A tensor-parallel worker process (runtime/shards.py): its shard's Engine.

    It runs what the driver's Engine sends, in the same order, until told to stop.
    """
    def handle(engine: Engine, op: str, args: tuple) -> None:
        if op == "decode_token":
            engine._decode_step(engine._upload(list(args)), int(args[0]))
        else:
            getattr(engine, op)(*args)

    run_worker(rank, shards, address, model_dir, engine_args, pipe,
               lambda params, args: Engine(model_dir, lib, params=params, **args), handle)
