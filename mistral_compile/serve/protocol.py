"""OpenAI request bodies checked into prompts and sampling; errors in OpenAI's shape."""

from __future__ import annotations

from typing import Any

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.requests import sampling_from
from mistral_compile.runtime.sampling import MAX_LOGPROBS, SamplingParams

# where a request gives no max_tokens: OpenAI's 16 for completions; for chat, until EOS or the
# context, at most this many (a windowed model has no context end)
CHAT_MAX_TOKENS = 4096
COMPLETION_MAX_TOKENS = 16


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (status, message, param,
                                                                       kind, code)

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _require(body: dict[str, Any], name: str, kind: type | tuple) -> Any:
    value = body.get(name)
    if value is None:
        raise APIError(400, f"'{name}' is required", name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise APIError(400, f"'{name}' has the wrong type", name)
    return value


def sampling(body: dict[str, Any], chat: bool) -> tuple[SamplingParams, int]:
    """SamplingParams and n from an OpenAI request body (chat: OpenAI's chat fields)."""
    entry = dict(body)
    if chat:
        if entry.get("max_completion_tokens") is not None:
            entry["max_tokens"] = entry["max_completion_tokens"]
        logprobs = entry.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise APIError(400, "'logprobs' must be true or false", "logprobs")
        top = entry.get("top_logprobs")
        if top is not None and not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        entry["logprobs"] = (top or 0) if logprobs else None
    elif isinstance(entry.get("logprobs"), bool):
        raise APIError(400, "'logprobs' must be an integer", "logprobs")
    n = entry.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
        raise APIError(400, "'n' must be an integer in [1, 64]", "n")
    defaults = {"temperature": 1.0,
                "max_tokens": CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS}
    try:
        params = sampling_from("request", {k: v for k, v in entry.items()
                                           if k not in ("temperature", "max_tokens")
                                           or v is not None}, defaults)
    except MistralCompileError as err:
        message = str(err).removeprefix("request: ")
        param = message.split("'")[1] if message.count("'") >= 2 else \
            message.split("=")[0] if "=" in message.split(":")[0] else None
        raise APIError(400, message, param) from None
    if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
        raise APIError(400, f"at most {MAX_LOGPROBS} logprobs", "logprobs")
    return params, n


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of a body (OpenAI's text content parts joined)."""
    messages = _require(body, "messages", list)
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, "each message needs a 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: the text ones
            texts = [p.get("text", "") for p in content if isinstance(p, dict)
                     and p.get("type") == "text"]
            m["content"] = "".join(texts)
    return messages


def prompt_of(body: dict[str, Any]) -> str | list[int]:
    """The one prompt of a completions body: text or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                   for t in prompt):
        return prompt
    raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt)", "prompt")
