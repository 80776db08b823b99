"""Streaming text generation over an Engine: chat templates, sampling, stop strings, usage."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mistral_compile.runtime.output import held_back
from mistral_compile.runtime.sampling import SamplingParams
from mistral_compile.tokenizer.base import Tokenizer, message_dicts

if TYPE_CHECKING:
    from mistral_compile.runtime.engine import Engine


@dataclass
class Usage:
    """What one generation cost: tokens and seconds; why it ended."""

    prompt_tokens: int = 0  # the whole prompt (conversation so far)
    prefilled_tokens: int = 0  # the part that was not already in the KV cache
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # eos, stop, length, context, interrupted

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


class TextStream:
    """An iterator of text pieces; ``usage``, ``text`` and ``tokens`` are set as it runs."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams) -> None:
        self.usage = Usage(prompt_tokens=len(prompt))
        self.text = ""
        self.tokens: list[int] = []
        self._gen = self._run(engine, prompt, params)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def _run(self, engine: Engine, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        tokenizer = engine.tokenizer
        eos = tokenizer.eos_ids
        new = engine.reuse_prefix(prompt)
        engine.interrupted.clear()
        start = time.perf_counter()
        logits = engine.prefill(new)
        self.usage.prefilled_tokens = len(new)
        self.usage.prefill_seconds = time.perf_counter() - start
        rng = np.random.default_rng(params.seed)
        decoder = tokenizer.stream_decoder()
        emitted = 0
        start = time.perf_counter()
        reason = ""
        steps = engine.continue_from(logits, params, rng, prompt)
        token = next(steps)
        try:
            while not reason:
                if engine.interrupted.is_set():
                    reason = "interrupted"
                    break
                if token in eos:
                    reason = "eos"
                    break
                self.tokens.append(token)
                self.text += decoder.push(token)
                hit = [i for i in (self.text.find(s) for s in params.stop) if i >= 0]
                if hit:
                    self.text, reason = self.text[:min(hit)], "stop"
                elif params.max_tokens and len(self.tokens) >= params.max_tokens:
                    reason = "length"
                elif engine.context_full():
                    reason = "context"
                safe = len(self.text) if reason else \
                    len(self.text) - held_back(self.text, params.stop)
                if safe > emitted:
                    piece, emitted = self.text[emitted:safe], safe
                    yield piece
                if reason:
                    break
                token = next(steps)
        finally:
            self.usage.completion_tokens = len(self.tokens)
            self.usage.decode_seconds = time.perf_counter() - start
            self.usage.finish_reason = reason or "interrupted"


def message_pairs(messages: Sequence[Any]) -> list[tuple[str, Any]]:
    """(role, content) of each message, dicts or mistral-common objects alike."""
    return [(m.get("role"), m.get("content")) for m in message_dicts(messages)]


@dataclass
class Turn:
    """One chat turn as the engine ran it: to continue from its exact tokens next time."""

    messages: list[tuple[str, Any]]
    prompt: list[int]
    stream: TextStream
    tools: Sequence[dict] | None = None


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[Any], last: Turn | None,
                tools: Sequence[dict] | None = None) -> list[int]:
    """The prompt tokens for ``messages``, reusing the tokens the model generated last turn.

    Re-tokenizing an answer's text need not give back the tokens the model produced, which would
    break cache reuse (and change what the model conditions on). When ``messages`` is the last
    turn's conversation plus its answer plus one user message, and the template only appends
    (true of Mistral's templates unless a system prompt moves, and of ChatML-style ones), the
    prompt is last turn's prompt + the generated tokens + the template's tokens from the one
    that closes the answer on (``Tokenizer.answer_tail``). Otherwise: the template's encoding.
    """
    full = tokenizer.encode_chat(messages, tools)
    if last is None or last.stream.usage.finish_reason in ("", "stop"):
        return full
    pairs = message_pairs(messages)
    n = len(last.messages)
    if (len(pairs) != n + 2 or pairs[:n] != last.messages
            or pairs[n] != ("assistant", last.stream.text) or pairs[n + 1][0] != "user"
            or last.tools != tools):
        return full
    tail = tokenizer.answer_tail(messages, tools)
    if tail is None:
        return full
    return last.prompt + last.stream.tokens + tail
