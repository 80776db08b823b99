"""Streaming text generation over an Engine: chat templates, sampling, stop strings, usage."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.sampling import SamplingParams

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


class StreamDecoder:
    """Token ids in, text increments out; holds back incomplete UTF-8 and keeps SPM spaces.

    Decodes a short window of recent tokens and emits what it adds to the window's text, so a
    word piece's leading space and multi-byte characters split over tokens come out right.
    """

    def __init__(self, tokenizer: Any) -> None:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        raw = tokenizer.instruct_tokenizer.tokenizer
        self._decode = lambda ids: raw.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)
        self.tokens: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text has been emitted

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.tokens)
            return after[len(before):]
        return ""


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


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
        eos = tokenizer.instruct_tokenizer.tokenizer.eos_id
        new = engine.reuse_prefix(prompt)
        engine.interrupted.clear()
        start = time.perf_counter()
        logits = engine.prefill(new)
        self.usage.prefilled_tokens = len(new)
        self.usage.prefill_seconds = time.perf_counter() - start
        rng = np.random.default_rng(params.seed)
        decoder = StreamDecoder(tokenizer)
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
                if token == eos:
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
                    len(self.text) - _held_back(self.text, params.stop)
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


def to_request(messages: Sequence[Any]) -> Any:
    """A mistral-common ChatCompletionRequest from {"role", "content"} dicts or message objects."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            if m.get("role") not in kinds or not isinstance(m.get("content"), str):
                raise MistralCompileError(f"messages[{i}]: expected role user/assistant/system "
                                          "and a string content")
            m = kinds[m["role"]](content=m["content"])
        out.append(m)
    return ChatCompletionRequest(messages=out)


def encode_chat(tokenizer: Any, messages: Sequence[Any]) -> list[int]:
    """The prompt tokens of a conversation, by the model's own chat template."""
    try:
        return list(tokenizer.encode_chat_completion(to_request(messages)).tokens)
    except MistralCompileError:
        raise
    except Exception as err:  # noqa: BLE001 - validation errors of mistral-common
        raise MistralCompileError(f"messages: {str(err).splitlines()[0]}") from None


def message_pairs(messages: Sequence[Any]) -> list[tuple[str, str]]:
    """(role, content) of each message, dicts or mistral-common objects alike."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append((m.get("role"), m.get("content")))
        else:
            out.append((getattr(m, "role", None), getattr(m, "content", None)))
    return out


@dataclass
class Turn:
    """One chat turn as the engine ran it: to continue from its exact tokens next time."""

    messages: list[tuple[str, str]]
    prompt: list[int]
    stream: TextStream


def chat_prompt(tokenizer: Any, messages: Sequence[Any], last: Turn | None) -> list[int]:
    """The prompt tokens for ``messages``, reusing the tokens the model generated last turn.

    Re-tokenizing an answer's text need not give back the tokens the model produced, which would
    break cache reuse (and change what the model conditions on). When ``messages`` is the last
    turn's conversation plus its answer plus one user message, and the template only appends
    (true for Mistral's templates unless a system prompt moves), the prompt is last turn's prompt
    + the generated tokens + EOS + the new user turn. Otherwise: the template's encoding as is.
    """
    full = encode_chat(tokenizer, messages)
    if last is None or last.stream.usage.finish_reason in ("", "stop"):
        return full
    pairs = message_pairs(messages)
    n = len(last.messages)
    eos = tokenizer.instruct_tokenizer.tokenizer.eos_id
    if (len(pairs) != n + 2 or pairs[:n] != last.messages
            or pairs[n] != ("assistant", last.stream.text) or pairs[n + 1][0] != "user"
            or eos not in full):
        return full
    before = encode_chat(tokenizer, messages[:n])
    if full[:len(before)] != before:  # the template rewrote earlier turns (e.g. system prompt)
        return full
    tail = full[len(full) - full[::-1].index(eos):]  # after the EOS that closes the answer
    return last.prompt + last.stream.tokens + [eos] + tail
