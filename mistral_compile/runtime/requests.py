"""Requests as JSON: one line of a `generate` input, checked, into (prompt ids, sampling)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.sampling import SamplingParams

# per-request sampling fields and their types (OpenAI's names; top_k, min_p,
# repetition_penalty and ignore_eos as vLLM's extensions)
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty")
INT_FIELDS = ("max_tokens", "top_k", "seed", "logprobs")
PROMPT_FIELDS = ("prompt_token_ids", "prompt", "messages")


@dataclass
class Request:
    """One input line: its id, prompt ids, sampling."""

    id: Any
    prompt: list[int]
    params: SamplingParams


def _number(where: str, name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        what = "a number" if kind is float else "an integer"
        raise MistralCompileError(f"{where}: '{name}' must be {what}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise MistralCompileError(f"{where}: '{name}' must be finite, got {value!r}")
    return kind(value)


def sampling_from(where: str, entry: dict[str, Any], defaults: dict[str, Any]) -> SamplingParams:
    """A request's SamplingParams: its fields over ``defaults``; bad values named."""
    fields = dict(defaults)
    for name in FLOAT_FIELDS:
        if entry.get(name) is not None:
            fields[name] = _number(where, name, entry[name], float)
    for name in INT_FIELDS:
        if entry.get(name) is not None:
            fields[name] = _number(where, name, entry[name], int)
    if entry.get("stop") is not None:
        stop = entry["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise MistralCompileError(f"{where}: 'stop' must be a string or a list of "
                                      "non-empty strings")
        fields["stop"] = stop
    if entry.get("logit_bias") is not None:
        bias = entry["logit_bias"]
        if not isinstance(bias, dict):
            raise MistralCompileError(f"{where}: 'logit_bias' must be an object of token id "
                                      "to bias")
        try:
            fields["logit_bias"] = {int(k): _number(where, f"logit_bias[{k}]", v, float)
                                    for k, v in bias.items()}
        except ValueError:
            raise MistralCompileError(f"{where}: 'logit_bias' keys must be token ids") from None
    if entry.get("ignore_eos") is not None:
        if not isinstance(entry["ignore_eos"], bool):
            raise MistralCompileError(f"{where}: 'ignore_eos' must be true or false")
        fields["ignore_eos"] = entry["ignore_eos"]
    try:
        return SamplingParams(**fields)
    except MistralCompileError as err:
        raise MistralCompileError(f"{where}: {err}") from None


def read_requests(path: str | Path, defaults: dict[str, Any],
                  tokenizer: Callable[[], Any], vocab_size: int) -> list[Request]:
    """Every line of a JSONL file as a Request; the first bad one is an error naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise MistralCompileError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise MistralCompileError(f"{path}: not UTF-8 text") from None
    requests, ids = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise MistralCompileError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(entry, dict):
            raise MistralCompileError(f"{where}: a line must be a JSON object")
        given = [f for f in PROMPT_FIELDS if entry.get(f) is not None]
        if len(given) != 1:
            raise MistralCompileError(f"{where}: give exactly one of 'prompt_token_ids', "
                                      "'prompt' or 'messages'")
        rid = entry.get("id", number)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid in ids:
            raise MistralCompileError(f"{where}: 'id' must be a unique string or integer")
        ids.add(rid)
        prompt = _prompt(where, given[0], entry[given[0]], tokenizer)
        if not prompt:
            raise MistralCompileError(f"{where}: '{given[0]}' gives no tokens")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise MistralCompileError(f"{where}: 'prompt_token_ids': {bad[0]} is outside the "
                                      f"vocabulary [0, {vocab_size})")
        params = sampling_from(where, entry, defaults)
        bias = [t for t in params.logit_bias if not 0 <= t < vocab_size]
        if bias:
            raise MistralCompileError(f"{where}: 'logit_bias': token id {bias[0]} is outside "
                                      f"the vocabulary [0, {vocab_size})")
        requests.append(Request(rid, prompt, params))
    if not requests:
        raise MistralCompileError(f"{path}: no requests")
    return requests


def _prompt(where: str, field: str, value: Any, tokenizer: Callable[[], Any]) -> list[int]:
    if field == "prompt_token_ids":
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in value):
            raise MistralCompileError(f"{where}: 'prompt_token_ids' must be a list of integers")
        return list(value)
    if field == "prompt":
        if not isinstance(value, str):
            raise MistralCompileError(f"{where}: 'prompt' must be a string")
        return tokenizer().encode(value)
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m
                                              for m in value):
        raise MistralCompileError(f"{where}: 'messages' must be a list of objects with a "
                                  "'role'")
    try:
        return tokenizer().encode_chat(value)
    except MistralCompileError as err:
        raise MistralCompileError(f"{where}: 'messages': {err}") from None
