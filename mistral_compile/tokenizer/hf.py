"""The Hugging Face family: tokenizer.json (the `tokenizers` library) and a Jinja chat template."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral_compile.errors import MistralCompileError
from mistral_compile.io import read_json_object
from mistral_compile.tokenizer.base import Tokenizer, message_dicts
from mistral_compile.tokenizer.template import ChatTemplate

logger = logging.getLogger("mistral_compile.tokenizer")

# What a Hugging Face tokenizer is made of (tokenizer.json is the one required file).
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja", "generation_config.json")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any, origin: str, key: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise MistralCompileError(f"{origin}: field '{key}': expected a string or an object "
                                  f"with 'content', got {value!r}")
    return value


def _template_source(model_dir: Path, config: dict) -> tuple[str | None, str]:
    """The chat template: chat_template.jinja, else tokenizer_config.json's (default entry)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    origin = str(model_dir / "tokenizer_config.json")
    value = config.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
        if value is None:
            raise MistralCompileError(f"{origin}: field 'chat_template': a list of templates "
                                      "with no 'default' entry")
    if value is not None and not isinstance(value, str):
        raise MistralCompileError(f"{origin}: field 'chat_template': expected a string, got "
                                  f"{type(value).__name__}")
    return value, origin


def _id_list(value: Any, origin: str, key: str) -> list[int]:
    """generation_config.json's eos_token_id: an int, a list of ints, or null."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise MistralCompileError(f"{origin}: field '{key}': expected an integer or a list of "
                                  f"integers, got {value!r}")
    return values


class HFTokenizer(Tokenizer):
    """``tokenizers.Tokenizer`` + tokenizer_config.json, behaving as transformers' tokenizer.

    BOS/EOS are added by tokenizer.json's post-processor alone (transformers 5 does the same
    for tokenizer.json files; tokenizer_config.json's ``add_bos_token`` does not change it).
    Chat prompts are rendered text encoded without added BOS/EOS (the template writes them).
    """

    family = "hf"

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer as Backend

        path = model_dir / "tokenizer.json"
        self.source = str(path)
        try:
            self.backend = Backend.from_file(str(path))
        except FileNotFoundError:
            raise MistralCompileError(f"{path}: file not found") from None
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise MistralCompileError(f"{path}: not a tokenizer.json the tokenizers library "
                                      f"reads ({str(err).splitlines()[0]})") from None
        config_path = model_dir / "tokenizer_config.json"
        config = read_json_object(config_path) if config_path.is_file() else {}
        legacy = model_dir / "special_tokens_map.json"
        legacy_map = read_json_object(legacy) if legacy.is_file() else {}
        self.special_tokens: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            origin, value = str(config_path), config.get(key)
            if value is None:
                origin, value = str(legacy), legacy_map.get(key)
            text = _token_text(value, origin, key)
            if text is not None:
                self.special_tokens[key] = text
        self.bos_id = self._special_id("bos_token", str(config_path))
        eos = self._special_id("eos_token", str(config_path))
        gen_path = model_dir / "generation_config.json"
        generation = read_json_object(gen_path) if gen_path.is_file() else {}
        gen_eos = _id_list(generation.get("eos_token_id"), str(gen_path), "eos_token_id")
        self.eos_ids = frozenset(([] if eos is None else [eos]) + gen_eos)
        if not self.eos_ids:
            raise MistralCompileError(f"{config_path}: field 'eos_token': no end-of-sequence "
                                      "token (nor eos_token_id in generation_config.json)")
        self._eos_id = eos if eos is not None else gen_eos[0]
        source, origin = _template_source(model_dir, config)
        self.template = ChatTemplate(source, origin) if source is not None else None
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self._size = max(vocab.values()) + 1 if vocab else 0

    def _special_id(self, key: str, origin: str) -> int | None:
        text = self.special_tokens.get(key)
        if text is None:
            return None
        token_id = self.backend.token_to_id(text)
        if token_id is None:
            raise MistralCompileError(f"{origin}: field '{key}': {text!r} is not in the "
                                      "vocabulary of tokenizer.json")
        return token_id

    @property
    def eos_id(self) -> int:
        """The tokenizer's own EOS (else generation_config.json's first)."""
        return self._eos_id

    @property
    def size(self) -> int:
        return self._size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Any], tools: Sequence[dict] | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (the template's output, before tokenizing)."""
        if self.template is None:
            raise MistralCompileError(f"{self.source}: the tokenizer has no chat template "
                                      "(chat_template in tokenizer_config.json or "
                                      "chat_template.jinja)")
        dicts = message_dicts(messages)
        for i, m in enumerate(dicts):
            if not isinstance(m.get("role"), str):
                raise MistralCompileError(f"messages[{i}]: expected a 'role' string")
        return self.template.render(dicts, self.special_tokens, tools, add_generation_prompt)

    def encode_chat(self, messages: Sequence[Any], tools: Sequence[dict] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, tools, add_generation_prompt),
                           add_special_tokens=False)

    def answer_tail(self, messages: Sequence[Any], tools: Sequence[dict] | None = None
                    ) -> list[int] | None:
        try:
            before = self.encode_chat(messages[:-2], tools)
            upto = self.encode_chat(messages[:-1], tools, add_generation_prompt=False)
        except MistralCompileError:  # e.g. a template that refuses to end on an answer
            return None
        full = self.encode_chat(messages, tools)
        if full[:len(upto)] != upto or upto[:len(before)] != before:
            return None
        for k in range(len(before), len(upto)):
            if upto[k] in self.eos_ids:
                return upto[k:] + full[len(upto):]
        return None
