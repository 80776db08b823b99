"""The model's tokenizer and chat template, from mistral-common (SentencePiece v1/v3, tekken)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mistral_compile.errors import MistralCompileError

logger = logging.getLogger("mistral_compile.runtime")

# Mistral tokenizer files in the order we look for them (newest format first).
TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model.v2",
                   "tokenizer.model.v1", "tokenizer.model")
# Versions that can be recorded at conversion when the checkpoint has no tokenizer file:
# mistral-common ships these tokenizers.
BUNDLED_VERSIONS = ("v1", "v3", "v3-tekken", "v7")


def find_tokenizer_file(model_dir: Path) -> Path | None:
    """The Mistral tokenizer file in ``model_dir``, if any."""
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def tokenizer_version(path: Path) -> str:
    """The version a tokenizer file holds (v1, v3, v3-tekken, v7 ...)."""
    tok = _from_file(path)
    raw = tok.instruct_tokenizer.tokenizer
    version = str(raw.version.value if hasattr(raw.version, "value") else raw.version)
    return f"{version}-tekken" if path.name.startswith("tekken") else version


def _from_file(path: Path) -> Any:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    try:
        return MistralTokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - mistral-common raises several types
        raise MistralCompileError(f"{path}: not a Mistral tokenizer ({err})") from None


def _bundled(version: str) -> Any:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    if version == "v1":
        return MistralTokenizer.v1()
    if version == "v3":
        return MistralTokenizer.v3()
    if version == "v3-tekken":
        return MistralTokenizer.v3(is_tekken=True)
    if version == "v7":
        return MistralTokenizer.v7()
    raise MistralCompileError(f"tokenizer version {version!r}: mistral-common has no bundled "
                              f"tokenizer for it (known: {', '.join(BUNDLED_VERSIONS)})")


def load_tokenizer(model_dir: Path, recorded_version: str | None, vocab_size: int) -> Any:
    """The tokenizer file in MODEL_DIR, else the version recorded at conversion; never a guess."""
    path = find_tokenizer_file(model_dir)
    if path is not None:
        tok = _from_file(path)
        source = str(path)
    elif recorded_version:
        tok = _bundled(recorded_version)
        source = f"mistral-common's bundled {recorded_version} tokenizer (recorded at conversion)"
    else:
        raise MistralCompileError(
            f"{model_dir}: no tokenizer ({', '.join(TOKENIZER_FILES)}) and no tokenizer version "
            "recorded at conversion; copy the model's tokenizer file there or convert with "
            "--tokenizer-version")
    n_words = tok.instruct_tokenizer.tokenizer.n_words
    if n_words != vocab_size:
        raise MistralCompileError(f"{source}: tokenizer has {n_words} tokens, the model's "
                                  f"vocab_size is {vocab_size}")
    logger.info("tokenizer: %s", source)
    return tok
