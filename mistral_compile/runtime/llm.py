"""The batched engine: requests in, a step at a time, tokens and text out (vLLM's LLMEngine).

Layers (each testable alone): Artifact (library + weights), KVCacheManager (pages), Scheduler
(continuous batching), ModelRunner (one ``batch_step``), Sampler (on the device), TextOutput
(text as a function of tokens). ``LLM.generate`` runs a list of requests to the end.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mistral_compile.abi import PAGE_SIZE, kv_groups, ring_width
from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.artifact import Artifact
from mistral_compile.runtime.kv_cache import KVCacheManager
from mistral_compile.runtime.output import StopRule, TextOutput
from mistral_compile.runtime.runner import ModelRunner, page_bytes
from mistral_compile.runtime.sampler import Sampler
from mistral_compile.runtime.sampling import SamplingParams
from mistral_compile.runtime.scheduler import Scheduler, Sequence
from mistral_compile.runtime.shards import run_worker, start_shards

logger = logging.getLogger("mistral_compile.runtime")

GPU_MEMORY_FRACTION = 0.90  # of the free memory after the weights, for pages by default
ACTIVATION_RESERVE = 2 << 30  # bytes kept free for a step's activations on a GPU
CPU_DEFAULT_KV = 1 << 30  # at most this much KV on a CPU unless told


@dataclass
class EngineConfig:
    """Engine settings (not the architecture): batch, chunk, pages, prefix caching, graphs."""

    max_batch_size: int = 64
    prefill_chunk_size: int | None = None  # tokens per sequence per step (config's default)
    max_step_tokens: int | None = None  # tokens per step (default chunk + batch)
    kv_cache_bytes: int | None = None  # page pools' total; None: from free memory
    num_pages: list[int] | None = None  # pages per window group (overrides kv_cache_bytes)
    prefix_caching: bool = True
    attention_sink_size: int = 0  # StreamingLLM sinks per sequence (0: the exact window)
    cuda_graphs: bool = True  # decode steps replayed from CUDA graphs (runtime/cuda_graph.py)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "prefill_chunk_size", "max_step_tokens",
                     "kv_cache_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise MistralCompileError(f"{name}={value}: must be a positive integer")
        sink = self.attention_sink_size
        if not isinstance(sink, int) or not 0 <= sink <= PAGE_SIZE:
            raise MistralCompileError(f"attention_sink_size={sink}: must be an integer from 0 "
                                      f"to {PAGE_SIZE} (one page) in the batched runtime")


@dataclass
class RequestOutput:
    """What a request produced so far; ``finished`` once it ended."""

    request_id: Any
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    piece: str = ""  # text added by the last step (streaming)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestLimits:
    """What a request must satisfy to run on an engine: vocabulary, context, pages, tokenizer."""

    vocab_size: int
    context: int  # tokens a sequence may hold when some layer has no window (0: no limit)
    full_pages: tuple[int, ...]  # the pool of each full-attention group, in pages
    has_tokenizer: bool

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise MistralCompileError, in one line, for a request that cannot run."""
        if not prompt:
            raise MistralCompileError("a prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise MistralCompileError(f"token id {bad[0]} is outside the vocabulary "
                                      f"[0, {self.vocab_size})")
        bias = [t for t in params.logit_bias if not 0 <= int(t) < self.vocab_size]
        if bias:
            raise MistralCompileError(f"logit_bias: token id {bias[0]} is outside the "
                                      f"vocabulary [0, {self.vocab_size})")
        if self.context > 0 and len(prompt) >= self.context:
            raise MistralCompileError(f"prompt of {len(prompt)} tokens leaves no room in the "
                                      f"context window ({self.context})")
        if params.stop and not self.has_tokenizer:
            raise MistralCompileError("stop strings need a tokenizer; the model has none")
        pages = len(range(0, len(prompt) + 1, PAGE_SIZE))
        for pool in self.full_pages:  # the longest sequence must fit the pool
            if pages > pool:
                raise MistralCompileError(f"prompt of {len(prompt)} tokens needs {pages} "
                                          f"KV pages, the cache has {pool}: give it more "
                                          "memory (--kv-cache-gb)")


class LLM:
    """Many sequences on one compiled model (see the module docstring)."""

    def __init__(self, model_dir: str | os.PathLike, lib: str | os.PathLike,
                 device: str = "cpu", engine_config: EngineConfig | None = None,
                 params: Mapping[str, Any] | None = None, tokenizer: str | None = None,
                 verify: bool = False, progress: bool = False,
                 artifact: Artifact | None = None) -> None:
        self._shards = None  # a tensor-parallel model's other processes (runtime/shards.py)
        if artifact is None:
            self._shards, params = start_shards(model_dir, lib, device, params,
                                                dict(engine_config=engine_config),
                                                serve_batch_shard)
        self.artifact = artifact or Artifact(model_dir, lib, device, params, progress, verify)
        self.config = cfg = self.artifact.config
        self.settings = settings = engine_config or EngineConfig()
        self.chunk_size = settings.prefill_chunk_size or cfg.prefill_chunk_size
        self.groups = kv_groups(cfg.layer_sliding_window_sizes)
        sink = settings.attention_sink_size
        if sink and (len(self.groups) != 1 or not sink < self.groups[0].window - 1):
            raise MistralCompileError(
                f"attention_sink_size={sink}: sinks need every layer windowed, with one window "
                f"larger than sinks + 1 (this model's: {cfg.layer_sliding_window_sizes[0]}"
                f"{'' if len(self.groups) == 1 else ' and others'}); use 0")
        if cfg.attention_sink_size and not sink:
            logger.info("the config's %d attention sinks apply to chat (the single-sequence "
                        "Engine); the batched runtime runs the exact window unless "
                        "attention_sink_size is set", cfg.attention_sink_size)
        pages = settings.num_pages or self._plan_pages()
        if len(pages) != len(self.groups) or min(pages) <= 0:
            raise MistralCompileError(f"num_pages={pages}: one positive count per window group "
                                      f"({len(self.groups)})")
        # with sinks a page's KV depends on how its sequence was chunked: no sharing
        self.kv = KVCacheManager(self.groups, pages, self.chunk_size, cfg.context_window_size,
                                 settings.prefix_caching and not sink, sink)
        self.scheduler = Scheduler(self.kv, settings.max_batch_size, self.chunk_size,
                                   settings.max_step_tokens)
        self.runner = ModelRunner(self.artifact, self.kv, settings.max_batch_size,
                                  settings.cuda_graphs)
        if self._shards is not None:
            shards = self._shards
            self.runner.mirror = lambda arrays, tables: shards.send("step", arrays, tables)
        self.sampler = Sampler(self.artifact)
        self._tokenizer_family = tokenizer
        self._tokenizer = None
        self._limits: RequestLimits | None = None
        self.outputs: dict[Any, RequestOutput] = {}
        self._text: dict[Any, TextOutput] = {}
        self._seqs: dict[Any, Sequence] = {}
        self.steps = 0
        logger.info("KV pages: %s of %d tokens (%.2f GiB) for %s", pages, PAGE_SIZE,
                    self.runner.pool_bytes / 2**30,
                    ", ".join(f"window {g.window if g.window > 0 else 'none'}: "
                              f"{len(g.layers)} layers"
                              for g in self.groups))

    def _plan_pages(self) -> list[int]:
        """Pages per group from the KV budget.

        Windowed groups get what a full batch needs, twice (the prefix cache keeps the rest),
        full-context groups share the remaining bytes. The budget: ``kv_cache_bytes``; on a GPU
        90% of the free memory less a reserve for activations; on a CPU what a full batch at
        full length needs, twice, at most CPU_DEFAULT_KV (1 GiB).
        """
        cfg, settings = self.config, self.settings
        sizes = [page_bytes(self.artifact, len(g.layers)) for g in self.groups]
        widths = [ring_width(g.window, self.chunk_size, cfg.context_window_size)
                  for g in self.groups]
        want = [2 * settings.max_batch_size * w for w in widths]
        budget = settings.kv_cache_bytes
        if budget is None:
            free = self.artifact.free_device_bytes()
            budget = min(CPU_DEFAULT_KV, sum(n * s for n, s in zip(want, sizes, strict=True))) \
                if free is None else int((free - ACTIVATION_RESERVE) * GPU_MEMORY_FRACTION)
            if free is not None and budget <= 0:
                raise MistralCompileError(f"{free / 2**30:.2f} GiB free on the GPU after the "
                                          "weights: no room for a KV cache (--kv-cache-gb sets "
                                          "its size)")
        full = [i for i, g in enumerate(self.groups) if g.window <= 0]
        pages = [0] * len(self.groups)
        if full:  # windowed groups first (bounded), the rest to the full ones by bytes
            for i, g in enumerate(self.groups):
                if g.window > 0:
                    pages[i] = min(want[i], budget // len(self.groups) // sizes[i])
            left = budget - sum(p * s for p, s in zip(pages, sizes, strict=True))
            for i in full:
                pages[i] = left // sum(sizes[j] for j in full)
        else:
            pages = [budget // sum(sizes)] * len(self.groups)
        if any(p < w for p, w in zip(pages, widths, strict=True)):
            raise MistralCompileError(f"a KV cache of {budget / 2**30:.3f} GiB holds {pages} "
                                      f"pages, fewer than one sequence needs ({widths}): "
                                      "give it more memory (--kv-cache-gb)")
        return pages

    # ---- tokenizer ----

    @property
    def tokenizer(self):  # noqa: ANN201 (Tokenizer, imported lazily)
        """The model's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from mistral_compile.tokenizer import load_tokenizer

            art = self.artifact
            self._tokenizer = load_tokenizer(art.model_dir, art.tokenizer_record,
                                             self.config.vocab_size, self._tokenizer_family)
        return self._tokenizer

    # ---- requests ----

    def add_request(self, request_id: Any, prompt: list[int],
                    params: SamplingParams | None = None, text: bool = True) -> RequestOutput:
        """Queue a prompt (token ids); it joins the running batch at the next step."""
        params = params or SamplingParams()
        if request_id in self.outputs and not self.outputs[request_id].finished:
            raise MistralCompileError(f"request {request_id!r} is already running")
        self.check_request(prompt, params)
        tokenizer = self.tokenizer if text and self.has_tokenizer() else None
        eos = frozenset(tokenizer.eos_ids) if tokenizer is not None else frozenset()
        context = self.config.context_window_size if min(
            self.config.layer_sliding_window_sizes) <= 0 else 0
        rule = StopRule(eos, tuple(params.stop), params.max_tokens, context, params.ignore_eos)
        seq = self.scheduler.add(request_id, prompt, params)
        self._seqs[request_id] = seq
        self._text[request_id] = TextOutput(len(prompt), rule, tokenizer)
        out = RequestOutput(request_id, list(prompt), arrival_time=time.perf_counter())
        self.outputs[request_id] = out
        return out

    def has_tokenizer(self) -> bool:
        """Whether the model has a tokenizer (text, EOS and stop strings need one)."""
        try:
            self.tokenizer  # noqa: B018
        except MistralCompileError:
            return False
        return True

    @property
    def limits(self) -> RequestLimits:
        """What a request must satisfy to run here (picklable: the server checks with it)."""
        if self._limits is None:
            cfg = self.config
            full = min(cfg.layer_sliding_window_sizes) <= 0
            self._limits = RequestLimits(
                cfg.vocab_size, cfg.context_window_size if full else 0,
                tuple(pool.num_pages for pool, g in zip(self.kv.pools, self.groups, strict=True)
                      if g.window <= 0), self.has_tokenizer())
        return self._limits

    def check_request(self, prompt: list[int], params: SamplingParams, where: str = "") -> None:
        """Refuse, in one line, a request this engine cannot run (``where`` names it)."""
        try:
            self.limits.check(prompt, params)
        except MistralCompileError as err:
            raise MistralCompileError(f"{where}: {err}" if where else str(err)) from None

    def abort(self, request_id: Any) -> None:
        """Cancel a request: its pages are freed now."""
        seq = self._seqs.get(request_id)
        if seq is not None and seq.status != "finished":
            self._end(seq, "abort")

    def _end(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.outputs[seq.request_id].finish_reason = reason
        del self._seqs[seq.request_id]
        del self._text[seq.request_id]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Run one batched step; the outputs that changed."""
        work = self.scheduler.schedule()
        changed = []
        for seq in self.scheduler.ended:  # alone, it outgrew the KV cache
            logger.warning("request %r ended: the KV cache (%s pages) cannot hold it",
                           seq.request_id, [p.num_pages for p in self.kv.pools])
            self.outputs[seq.request_id].finish_reason = seq.finish_reason
            self._seqs.pop(seq.request_id, None)
            self._text.pop(seq.request_id, None)
            changed.append(self.outputs[seq.request_id])
        self.scheduler.ended.clear()
        if not work:
            if self.scheduler.has_work() and not changed:
                raise MistralCompileError("the KV cache cannot hold the waiting request's next "
                                          "step: give the engine more pages")
            return changed
        logits = self.runner.run(work)
        tokens, logprobs = self.sampler.sample(logits, [w.seq for w in work])
        self.scheduler.completed(work)
        self.steps += 1
        now = time.perf_counter()
        for i, w in enumerate(work):
            if not w.samples:
                continue
            seq, out = w.seq, self.outputs[w.seq.request_id]
            seq.tokens.append(int(tokens[i]))
            text = self._text[seq.request_id]
            out.piece = text.push(int(tokens[i]))
            out.token_ids, out.text = text.tokens, text.text
            if logprobs is not None and seq.params.logprobs is not None:
                out.logprobs.append(logprobs[i])
            out.cached_tokens = seq.cached_tokens
            if out.first_token_time is None:
                out.first_token_time = now
            out.token_times.append(now)
            if text.finish_reason is not None:
                self._end(seq, text.finish_reason)
            changed.append(out)
        return changed

    def generate(self, prompts: Iterable[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run every prompt to its end, batched; outputs in the order of the prompts."""
        prompts = list(prompts)
        each = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, each, strict=True)):
            ids.append(("generate", i, time.monotonic_ns()))
            self.add_request(ids[-1], prompt, p)
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not progress)
        while self.has_unfinished():
            done = sum(o.finished for o in self.step())
            bar.update(done)
        bar.close()
        return [self.outputs.pop(i) for i in ids]

    def close(self) -> None:
        """Stop a tensor-parallel model's other shards (their processes); else nothing."""
        if self._shards is not None:
            self._shards.close()
            self._shards = None

    def stats(self) -> dict[str, int]:
        """Running and waiting sequences, pages, prefix-cache hits, preemptions, steps."""
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "preemptions": self.scheduler.preemptions, "steps": self.steps,
                **self.kv.stats()}


def serve_batch_shard(rank: int, shards: int, address: str, model_dir: str, lib: str,
                      llm_args: dict[str, Any], pipe: Any) -> None:
    """A tensor-parallel worker of the batched runtime (runtime/shards.py): its shard's runner.

    It runs each step the driver's scheduler made (the host arrays the driver sends) on its
    own pages, in the same order, until told to stop; sampling stays in the driver.
    """
    run_worker(rank, shards, address, model_dir, llm_args, pipe,
               lambda params, args: LLM(model_dir, lib, params=params, **args),
               lambda llm, _op, args: llm.runner.execute(*args))
