"""A GGUF file's tokenizer rebuilt as Hugging Face tokenizer.json and tokenizer_config.json.

From the vocabulary, merges or scores, special ids and chat template in its metadata, built as
transformers' GGUF loader builds it, with the `tokenizers` library: ``gpt2`` is byte-level BPE
split by the regex llama.cpp names in ``tokenizer.ggml.pre``; ``llama`` is SentencePiece-style
BPE with byte fallback (merges recovered from the scores when absent). Control tokens become
special added tokens, user-defined ones plain added tokens; EOS/EOT/EOM ids go to
generation_config.json.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from mistral_compile.errors import MistralCompileError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how text is split before byte-level BPE (None: GPT-2's own regex)
PRE_SPLITS = {"default": None, "gpt-2": None, "gpt2": None, "smollm": "digits",
              "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3,
              "falcon3": _LLAMA3, "pixtral": _LLAMA3, "tekken": _TEKKEN, "qwen2": _QWEN2}
WRITTEN = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (byte-level BPE vocabularies are written in it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _field(gguf: Any, key: str, kind: type, required: bool = True) -> Any:
    value = gguf.meta(key)
    if value is None and not required:
        return None
    if value is None:
        raise MistralCompileError(f"{gguf.path}: field '{key}': missing (needed to rebuild the "
                                  "tokenizer)")
    if kind is list and not isinstance(value, list):
        raise MistralCompileError(f"{gguf.path}: field '{key}': expected an array")
    return value


def _byte_level(gguf: Any, tokens: list[str], merges: list[str], pre: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if pre not in PRE_SPLITS:
        raise MistralCompileError(f"{gguf.path}: field 'tokenizer.ggml.pre': {pre!r} is not a "
                                  f"pre-tokenizer we know (known: {', '.join(PRE_SPLITS)})")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab[tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode())] = i
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise MistralCompileError(f"{gguf.path}: field 'tokenizer.ggml.merges': entry {m!r}"
                                      " is not two tokens separated by a space")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    split = PRE_SPLITS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":  # SmolLM's own tokenizer.json: digits one by one, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The SentencePiece merges a scored vocabulary implies.

    Each token's two-piece splits, best merged score first: the order transformers'
    generate_merges gives.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=True):
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(gguf: Any, tokens: list[str], merges: list[str] | None,
                   unk: str | None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = _field(gguf, "tokenizer.ggml.scores", list)
        if len(scores) != len(tokens):
            raise MistralCompileError(f"{gguf.path}: field 'tokenizer.ggml.scores': "
                                      f"{len(scores)} scores for {len(tokens)} tokens")
        pairs = _merges_from_scores(tokens, [float(s) for s in scores])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


def write_gguf_tokenizer(gguf: Any, out: Path) -> list[str]:
    """Write the GGUF's tokenizer into ``out`` as Hugging Face files; returns their names."""
    from tokenizers import AddedToken, processors

    model = _field(gguf, "tokenizer.ggml.model", str)
    tokens = _field(gguf, "tokenizer.ggml.tokens", list)
    types = _field(gguf, "tokenizer.ggml.token_type", list, required=False) or []
    merges = _field(gguf, "tokenizer.ggml.merges", list, required=False)
    ids = {name: gguf.meta(f"tokenizer.ggml.{key}") for name, key in
           (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
            ("pad", "padding_token_id"), ("eot", "eot_token_id"), ("eom", "eom_token_id"))}
    for name, value in ids.items():
        if value is not None and not 0 <= int(value) < len(tokens):
            raise MistralCompileError(f"{gguf.path}: field 'tokenizer.ggml.{name}_token_id': "
                                      f"{value} is not a token id (vocabulary of {len(tokens)})")
    if ids["eos"] is None:
        raise MistralCompileError(f"{gguf.path}: field 'tokenizer.ggml.eos_token_id': missing "
                                  "(generation could never end)")
    text = {name: tokens[int(v)] for name, v in ids.items() if v is not None}
    if model == "gpt2":
        if merges is None:
            raise MistralCompileError(f"{gguf.path}: field 'tokenizer.ggml.merges': missing "
                                      "(a gpt2 tokenizer needs its merges)")
        tok = _byte_level(gguf, tokens, merges, gguf.meta("tokenizer.ggml.pre", "default"))
        alphabet = set(bytes_to_unicode().values())
        add_bos = bool(gguf.meta("tokenizer.ggml.add_bos_token", False))
    elif model == "llama":
        tok = _sentencepiece(gguf, tokens, merges, text.get("unk"))
        alphabet = None
        add_bos = bool(gguf.meta("tokenizer.ggml.add_bos_token", True))
    else:
        raise MistralCompileError(f"{gguf.path}: field 'tokenizer.ggml.model': {model!r} is not "
                                  "supported (gpt2 or llama)")
    add_eos = bool(gguf.meta("tokenizer.ggml.add_eos_token", False))
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types, strict=False)
               if kind == CONTROL and (alphabet is None or set(t) <= alphabet)]
    tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(tokens, types, strict=False)
                    if kind == USER_DEFINED and t in vocab])
    single, specials = "$A:0", []
    if add_bos and "bos" in text:
        single, specials = f"{text['bos']}:0 {single}", [(text["bos"], int(ids["bos"]))]
    if add_eos:
        single += f" {text['eos']}:0"
        specials.append((text["eos"], int(ids["eos"])))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    tok.save(str(out / "tokenizer.json"))
    config = {f"{name}_token": text[name] for name in ("bos", "eos", "unk", "pad") if name in text}
    config.update(add_bos_token=add_bos, add_eos_token=add_eos,
                  tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    template = gguf.meta("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    eos = [int(ids[k]) for k in ("eos", "eot", "eom") if ids[k] is not None]
    generation = {"eos_token_id": list(dict.fromkeys(eos))}
    if ids["bos"] is not None:
        generation["bos_token_id"] = int(ids["bos"])
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return list(WRITTEN)
