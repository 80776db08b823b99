"""A sequence's text output as a function of its tokens: detokenized text, stop strings, ends.

``finish`` says whether (and why) generation ends after the tokens generated so far; ``text``
is what a client sees. Both depend only on the tokens and the request, so streaming pieces,
the final text and the finish reason are the same whichever batch the sequence ran in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mistral_compile.tokenizer.base import Tokenizer


@dataclass(frozen=True)
class StopRule:
    """When a sequence ends: EOS ids, stop strings, a token budget, the context."""

    eos_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None
    max_length: int = 0  # prompt + output tokens at most (0: no limit)
    ignore_eos: bool = False


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


def render(output: Sequence[int], prompt_length: int, rule: StopRule,
           tokenizer: Tokenizer | None) -> tuple[str, list[int], str | None]:
    """(text, tokens kept, finish reason or None) for the generated tokens ``output``.

    EOS ends generation and is not part of the text (its id is kept, as vLLM does); a stop
    string ends it and is cut from the text; ``length`` is the token budget or the context.
    """
    text, kept = "", []
    decoder = tokenizer.stream_decoder() if tokenizer is not None else None
    def flushed() -> str:
        return text + decoder.flush() if decoder is not None else text

    for i, token in enumerate(output):
        kept.append(token)
        if token in rule.eos_ids and not rule.ignore_eos:
            return flushed(), kept, "stop"
        if decoder is not None:
            text += decoder.push(token)
            hit = [j for j in (text.find(s) for s in rule.stop) if j >= 0]
            if hit:
                return text[:min(hit)], kept, "stop"
        if rule.max_tokens is not None and i + 1 >= rule.max_tokens:
            return flushed(), kept, "length"
        if rule.max_length and prompt_length + i + 1 >= rule.max_length:
            return flushed(), kept, "length"
    return text, kept, None


class TextOutput:
    """``render`` kept up to date one token at a time (the same result, linear cost)."""

    def __init__(self, prompt_length: int, rule: StopRule, tokenizer: Tokenizer | None) -> None:
        self.prompt_length, self.rule, self.tokenizer = prompt_length, rule, tokenizer
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.text, self.tokens = "", []
        self.finish_reason: str | None = None
        self.emitted = 0  # characters handed out as stream pieces
        self._hit = False  # ended by a stop string (the text is cut there)

    def push(self, token: int) -> str:
        """Add a generated token; the text that can be streamed now (stop strings held back)."""
        assert self.finish_reason is None
        rule = self.rule
        self.tokens.append(token)
        if token in rule.eos_ids and not rule.ignore_eos:
            self.finish_reason = "stop"
        else:
            if self.decoder is not None:
                self.text += self.decoder.push(token)
                hit = [j for j in (self.text.find(s) for s in rule.stop) if j >= 0]
                if hit:
                    self.text, self.finish_reason = self.text[:min(hit)], "stop"
                    self._hit = True
            n = len(self.tokens)
            if self.finish_reason is None and (
                    (rule.max_tokens is not None and n >= rule.max_tokens)
                    or (rule.max_length and self.prompt_length + n >= rule.max_length)):
                self.finish_reason = "length"
        if self.finish_reason is not None and self.decoder is not None and not self._hit:
            self.text += self.decoder.flush()
        safe = len(self.text) if self.finish_reason else \
            len(self.text) - held_back(self.text, rule.stop)
        piece = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece
