"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step, in this order: running sequences with one token pending (decode) join; then
running sequences still reading their prompt get chunks; then waiting sequences are admitted
first come, first served, after taking what the prefix cache holds for them. A step carries at
most ``max_batch_size`` sequences and ``max_step_tokens`` tokens, a sequence at most
``chunk_size`` of them. When pages run out for a running sequence the newest running one is
preempted: its pages are dropped and it waits again with every token it has, to be recomputed
(through the prefix cache where the pages are still there). No other sequence's state changes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mistral_compile.runtime.kv_cache import KVCacheManager, SequencePages
from mistral_compile.runtime.sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    """A request and its state: its tokens (prompt, then generated) and its pages."""

    request_id: Any
    prompt: list[int]
    params: SamplingParams
    pages: SequencePages
    arrival: int
    tokens: list[int] = field(default_factory=list)
    status: str = "waiting"  # waiting, running, finished
    finish_reason: str | None = None
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache gave it (first admission)
    admitted: bool = False
    seed: int = 0  # the sampling noise's key (the request's seed, else a random one)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache (the prompt's rest, or the last sampled token)."""
        return len(self.tokens) - self.pages.length


@dataclass
class Work:
    """One sequence's share of a step: ``count`` tokens from position ``start``."""

    seq: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """Whether the step ends the sequence's pending tokens (its logits give a token)."""
        return self.start + self.count == len(self.seq.tokens)


class Scheduler:
    """FCFS continuous batching over a KVCacheManager (see the module docstring)."""

    def __init__(self, kv: KVCacheManager, max_batch_size: int, chunk_size: int,
                 max_step_tokens: int | None = None) -> None:
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.chunk_size = chunk_size
        self.max_step_tokens = max_step_tokens or chunk_size + max_batch_size
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.ended: list[Sequence] = []  # ended by the scheduler (cache full), to report
        self._arrivals = itertools.count()
        self._rng = np.random.default_rng()

    def add(self, request_id: Any, prompt: list[int], params: SamplingParams) -> Sequence:
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        seq = Sequence(request_id, list(prompt), params, self.kv.new_sequence(),
                       next(self._arrivals), seed=seed % 2**32)
        self.waiting.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Work]:
        """The next step's work; pages for it are reserved."""
        work: list[Work] = []
        budget = self.max_step_tokens
        scheduled: set[int] = set()
        decoding = [s for s in self.running if s.pending == 1]
        reading = [s for s in self.running if s.pending > 1]
        for seq in decoding + reading:
            if seq.status != "running" or budget <= 0:
                continue
            count = min(seq.pending, self.chunk_size, budget)
            if not self._reserve(seq, count, scheduled):
                continue
            work.append(Work(seq, seq.pages.length, count))
            scheduled.add(id(seq))
            budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.pages.length == 0:
                hit = self.kv.match_prefix(seq.pages, seq.tokens)
                if not seq.admitted:
                    seq.cached_tokens = hit
            count = min(seq.pending, self.chunk_size, budget)
            if not self.kv.reserve(seq.pages, count):
                self.kv.release(seq.pages)  # wait for pages without holding any
                break
            self.waiting.pop(0)
            seq.status, seq.admitted = "running", True
            self.running.append(seq)
            work.append(Work(seq, seq.pages.length, count))
            scheduled.add(id(seq))
            budget -= count
        return work

    def _reserve(self, seq: Sequence, count: int, scheduled: set[int]) -> bool:
        """Pages for ``count`` tokens of a running sequence, preempting newer ones if needed.

        A sequence that cannot grow even with every other one gone ends ("length": the cache
        is full) instead of being recomputed forever.
        """
        while not self.kv.reserve(seq.pages, count):
            victims = [s for s in self.running if id(s) not in scheduled and s is not seq]
            victim = max(victims, key=lambda s: s.arrival) if victims else seq
            if victim.arrival < seq.arrival:
                victim = seq  # never preempt an older sequence for a newer one
            if victim is seq and len(self.running) == 1:
                self.finish(seq, "length")
                self.ended.append(seq)
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Drop a running sequence's pages; it waits (in arrival order) to be recomputed."""
        self.kv.release(seq.pages)
        self.running.remove(seq)
        seq.status = "waiting"
        seq.preemptions += 1
        self.preemptions += 1
        at = next((i for i, s in enumerate(self.waiting) if s.arrival > seq.arrival),
                  len(self.waiting))
        self.waiting.insert(at, seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (a stop condition, or cancelled): its pages are dropped at once."""
        self.kv.release(seq.pages)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = "finished", reason

    def completed(self, work: list[Work]) -> None:
        """The step ran: each sequence's KV now includes its tokens of the step."""
        for w in work:
            self.kv.advance(w.seq.pages, w.seq.tokens, w.count)
