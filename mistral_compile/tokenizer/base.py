"""The tokenizer interface every family implements, and streaming detokenization over it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any


class Tokenizer(ABC):
    """Text <-> token ids and chat prompts for one model, whatever library does the work.

    ``eos_ids`` holds every id that ends generation (the tokenizer's EOS and those of
    ``generation_config.json``); ``source`` names the files it was read from, for messages.
    """

    family: str = ""
    source: str = ""
    bos_id: int | None = None
    eos_ids: frozenset[int] = frozenset()

    @property
    @abstractmethod
    def size(self) -> int:
        """Ids this tokenizer can produce: one more than the largest (added tokens included)."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of ``text`` (with BOS/EOS where the tokenizer adds them, if asked)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``."""

    @abstractmethod
    def encode_chat(self, messages: Sequence[Any], tools: Sequence[dict] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids of a conversation, by the model's chat template."""

    @abstractmethod
    def answer_tail(self, messages: Sequence[Any], tools: Sequence[dict] | None = None
                    ) -> list[int] | None:
        """The ids of ``encode_chat(messages)`` from the token that closes the answer on.

        ``messages`` is a conversation, an assistant answer and a new user message. None when
        the template does not encode it as prefix + answer + tail (then no reuse).
        """

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder (special tokens skipped)."""
        return StreamDecoder(lambda ids: self.decode(ids, skip_special_tokens=True))


class StreamDecoder:
    """Token ids in, text increments out; holds back incomplete UTF-8 and keeps leading spaces.

    Decodes a short window of recent tokens and emits what it adds to the window's text, so a
    SentencePiece word piece's leading space and multi-byte characters split over byte-level
    BPE tokens come out right (a trailing U+FFFD means bytes are still missing).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
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

    def flush(self) -> str:
        """The text still held back (incomplete UTF-8 shows as U+FFFD, as a full decode)."""
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        self._prefix = self._read = len(self.tokens)
        return after[len(before):] if len(after) > len(before) else ""


def message_dicts(messages: Sequence[Any]) -> list[dict]:
    """Messages as plain dicts (dicts pass through; pydantic/mistral-common objects are dumped)."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append(m)
        elif callable(getattr(m, "model_dump", None)):
            out.append({k: v for k, v in m.model_dump().items() if v is not None})
        else:
            out.append({"role": getattr(m, "role", None), "content": getattr(m, "content", None)})
    return out
