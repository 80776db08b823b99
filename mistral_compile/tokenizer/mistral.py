"""The mistral-common family: SentencePiece v1/v3 and tekken tokenizers with Mistral's templates."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral_compile.errors import MistralCompileError
from mistral_compile.tokenizer.base import Tokenizer

# Mistral tokenizer files in the order we look for them (newest format first).
MISTRAL_FILES = ("tekken.json", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model.v2",
                 "tokenizer.model.v1", "tokenizer.model")
# Versions that can be recorded at conversion when the checkpoint has no tokenizer file:
# mistral-common ships these tokenizers.
BUNDLED_VERSIONS = ("v1", "v3", "v3-tekken", "v7")


def find_mistral_file(model_dir: Path, plain_sentencepiece: bool = True) -> Path | None:
    """The Mistral tokenizer file in ``model_dir``, if any (``tokenizer.model`` if allowed)."""
    for name in MISTRAL_FILES:
        if name == "tokenizer.model" and not plain_sentencepiece:
            continue
        if (model_dir / name).is_file():
            return model_dir / name
    return None


class MistralCommonTokenizer(Tokenizer):
    """A mistral-common ``MistralTokenizer``; chat prompts by its own request encoding."""

    family = "mistral-common"

    def __init__(self, tok: Any, source: str) -> None:
        self.tok = tok
        self.raw = tok.instruct_tokenizer.tokenizer
        self.source = source
        self.bos_id = self.raw.bos_id
        self.eos_ids = frozenset([self.raw.eos_id])

    @classmethod
    def from_file(cls, path: Path) -> MistralCommonTokenizer:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        try:
            return cls(MistralTokenizer.from_file(str(path)), str(path))
        except Exception as err:  # noqa: BLE001 - mistral-common raises several types
            raise MistralCompileError(f"{path}: not a Mistral tokenizer ({err})") from None

    @classmethod
    def bundled(cls, version: str) -> MistralCommonTokenizer:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        makers = {"v1": MistralTokenizer.v1, "v3": MistralTokenizer.v3,
                  "v3-tekken": lambda: MistralTokenizer.v3(is_tekken=True),
                  "v7": MistralTokenizer.v7}
        if version not in makers:
            raise MistralCompileError(f"tokenizer version {version!r}: mistral-common has no "
                                      f"bundled tokenizer for it (known: "
                                      f"{', '.join(BUNDLED_VERSIONS)})")
        return cls(makers[version](), f"mistral-common's bundled {version} tokenizer")

    @property
    def version(self) -> str:
        """v1, v3, v3-tekken, v7 ..."""
        raw = self.raw.version
        version = str(raw.value if hasattr(raw, "value") else raw)
        return f"{version}-tekken" if type(self.raw).__name__ == "Tekkenizer" else version

    @property
    def size(self) -> int:
        return int(self.raw.n_words)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.raw.encode(text, bos=add_special_tokens, eos=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        policy = SpecialTokenPolicy.IGNORE if skip_special_tokens else SpecialTokenPolicy.KEEP
        return self.raw.decode(list(ids), special_token_policy=policy)

    def encode_chat(self, messages: Sequence[Any], tools: Sequence[dict] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        if not add_generation_prompt:
            raise MistralCompileError("mistral-common chat prompts always end with the user's "
                                      "turn (add_generation_prompt=False is not supported)")
        try:
            return list(self.tok.encode_chat_completion(_request(messages, tools)).tokens)
        except MistralCompileError:
            raise
        except Exception as err:  # noqa: BLE001 - validation errors of mistral-common
            raise MistralCompileError(f"messages: {str(err).splitlines()[0]}") from None

    def answer_tail(self, messages: Sequence[Any], tools: Sequence[dict] | None = None
                    ) -> list[int] | None:
        # Mistral's templates close an answer with EOS and never put EOS in a user turn
        full = self.encode_chat(messages, tools)
        before = self.encode_chat(messages[:-2], tools)
        eos = self.raw.eos_id
        if full[:len(before)] != before or eos not in full[len(before):]:
            return None  # the template rewrote earlier turns (e.g. a system prompt moved)
        return full[len(full) - 1 - full[::-1].index(eos):]


def _request(messages: Sequence[Any], tools: Sequence[dict] | None) -> Any:
    """A mistral-common ChatCompletionRequest from {"role", "content"} dicts or message objects."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage,
             "tool": ToolMessage}
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            if m.get("role") not in kinds:
                raise MistralCompileError(f"messages[{i}]: role must be one of "
                                          f"{', '.join(kinds)}, got {m.get('role')!r}")
            if m["role"] != "assistant" and not isinstance(m.get("content"), str):
                raise MistralCompileError(f"messages[{i}]: content must be a string")
            try:
                m = kinds[m["role"]](**{k: v for k, v in m.items() if k != "role"})
            except Exception as err:  # noqa: BLE001 - pydantic validation
                raise MistralCompileError(f"messages[{i}]: {str(err).splitlines()[0]}") from None
        out.append(m)
    try:
        return ChatCompletionRequest(messages=out, tools=list(tools) if tools else None)
    except Exception as err:  # noqa: BLE001 - pydantic validation
        raise MistralCompileError(f"tools: {str(err).splitlines()[0]}") from None
