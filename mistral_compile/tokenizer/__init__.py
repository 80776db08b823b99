"""Tokenizers: one interface (base.Tokenizer) over mistral-common and Hugging Face tokenizers.

Which family a model directory uses (``choose_family``), in order:

1. the family asked for (``--tokenizer mistral`` or ``--tokenizer hf``);
2. mistral-common when a Mistral-specific file is there (tekken.json, tokenizer.model.v*):
   official Mistral repos ship these next to a tokenizer.json, and mistral-common's encoding is
   the reference for their chat format;
3. Hugging Face when tokenizer.json is there (fine-tunes with their own chat template);
4. mistral-common when only a plain SentencePiece tokenizer.model is there;
5. otherwise a mistral-common version recorded at conversion (``--tokenizer-version``), else
   no tokenizer: token ids still work, text and chat are a one-line error. Never a guess.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mistral_compile.errors import MistralCompileError
from mistral_compile.tokenizer.base import StreamDecoder, Tokenizer
from mistral_compile.tokenizer.hf import HF_FILES, HFTokenizer
from mistral_compile.tokenizer.mistral import (
    BUNDLED_VERSIONS,
    MISTRAL_FILES,
    MistralCommonTokenizer,
    find_mistral_file,
)

logger = logging.getLogger("mistral_compile.tokenizer")

MISTRAL, HF = "mistral-common", "hf"
FAMILY_CHOICES = {"auto": None, "mistral": MISTRAL, "hf": HF}  # --tokenizer values
TOKENIZER_FILES = tuple(dict.fromkeys(MISTRAL_FILES + HF_FILES))  # copied by convert-weight

__all__ = ["BUNDLED_VERSIONS", "FAMILY_CHOICES", "HF", "MISTRAL", "TOKENIZER_FILES",
           "StreamDecoder", "Tokenizer", "choose_family", "load_tokenizer", "tokenizer_record"]


def choose_family(model_dir: Path, requested: str | None = None) -> str | None:
    """The tokenizer family of ``model_dir`` by the rule above (None: no tokenizer files)."""
    has_hf = (model_dir / "tokenizer.json").is_file()
    if requested == HF:
        if not has_hf:
            raise MistralCompileError(f"{model_dir / 'tokenizer.json'}: --tokenizer hf needs "
                                      "this file")
        return HF
    if requested == MISTRAL:
        return MISTRAL if find_mistral_file(model_dir) is not None else None
    if requested is not None:
        raise MistralCompileError(f"--tokenizer {requested!r}: choose from "
                                  f"{', '.join(FAMILY_CHOICES)}")
    if find_mistral_file(model_dir, plain_sentencepiece=False) is not None:
        return MISTRAL
    if has_hf:
        return HF
    return MISTRAL if find_mistral_file(model_dir) is not None else None


def _open(model_dir: Path, family: str | None, version: str | None) -> Tokenizer:
    if family == HF:
        return HFTokenizer(model_dir)
    path = find_mistral_file(model_dir)
    if family == MISTRAL and path is not None:
        return MistralCommonTokenizer.from_file(path)
    if version:
        return MistralCommonTokenizer.bundled(version)
    raise MistralCompileError(
        f"{model_dir}: no tokenizer (tokenizer.json, {', '.join(MISTRAL_FILES)}) and no "
        "tokenizer version recorded at conversion; copy the model's tokenizer files there or "
        "convert with --tokenizer-version")


def load_tokenizer(model_dir: Path, record: dict | None, vocab_size: int,
                   requested: str | None = None, quiet: bool = False) -> Tokenizer:
    """The tokenizer of a converted model: the family its manifest records (or ``requested``).

    ``record`` is the manifest's "tokenizer" entry (see ``tokenizer_record``); its ids must fit
    the model's vocabulary (mistral-common tokenizers must match it exactly).
    """
    record = record or {}
    version = record.get("version")
    if requested is not None:
        family = choose_family(model_dir, requested)
    elif "family" in record:
        family = record["family"]
    else:  # manifests written before the Hugging Face family: mistral-common or nothing
        family = MISTRAL if record.get("file") else None
    tok = _open(model_dir, family, version)
    if tok.family == MISTRAL and tok.size != vocab_size:
        raise MistralCompileError(f"{tok.source}: tokenizer has {tok.size} tokens, the model's "
                                  f"vocab_size is {vocab_size}")
    if tok.size > vocab_size:
        raise MistralCompileError(f"{tok.source}: tokenizer has ids up to {tok.size - 1}, the "
                                  f"model's vocab_size is {vocab_size}")
    if not quiet:
        logger.info("tokenizer: %s (%s)", tok.source, tok.family)
    return tok


def tokenizer_record(model_dir: Path, vocab_size: int, requested: str | None = None,
                     version: str | None = None) -> dict:
    """The manifest's "tokenizer" entry for the files in ``model_dir``, checked by loading them.

    {"family": "mistral-common" | "hf" | None, "files": [...], "version": "v3" | None}
    """
    family = choose_family(model_dir, requested)
    if version is not None and version not in BUNDLED_VERSIONS:
        raise MistralCompileError(f"--tokenizer-version {version!r}: choose from "
                                  f"{', '.join(BUNDLED_VERSIONS)}")
    if family is None and version is None:
        logger.warning("no tokenizer (tokenizer.json, tekken.json, tokenizer.model*) in the "
                       "checkpoint: chat will need one, or convert with --tokenizer-version")
        return {"family": None, "files": [], "version": None}
    if family is None:
        family = MISTRAL
    if version is not None and family != MISTRAL:
        raise MistralCompileError(f"--tokenizer-version {version}: the checkpoint's tokenizer "
                                  "is a Hugging Face tokenizer.json (--tokenizer-version names "
                                  "mistral-common tokenizers)")
    tok = load_tokenizer(model_dir, {"family": family, "version": version}, vocab_size,
                         quiet=True)
    logger.info("tokenizer: %s (%s)", tok.family, ", ".join(
        name for name in TOKENIZER_FILES if (model_dir / name).is_file()) or tok.source)
    if family == MISTRAL:
        found = tok.version
        if version and version != found:
            raise MistralCompileError(f"--tokenizer-version {version}: the checkpoint's "
                                      f"{Path(tok.source).name} is {found}")
        path = find_mistral_file(model_dir)
        return {"family": MISTRAL, "files": [path.name] if path else [], "version": found}
    files = [name for name in HF_FILES if (model_dir / name).is_file()]
    return {"family": HF, "files": files, "version": None}
