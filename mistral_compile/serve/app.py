"""The FastAPI application: OpenAI's /v1/chat/completions, /v1/completions, /v1/models, health."""


import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.llm import RequestOutput
from mistral_compile.serve.protocol import APIError, messages_of, prompt_of, sampling

MAX_BODY_BYTES = 8 << 20


def build_app(engine: Any, model_name: str, api_key: str | None = None,
              max_queue: int = 1024) -> Any:  # a FastAPI app (imported lazily)
    """The app serving ``engine`` (EngineProcess or AsyncEngine) as model ``model_name``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="mistral-compile", docs_url=None, redoc_url=None)
    created = int(time.time())
    metrics = Metrics(engine)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001, ANN202
        if request.url.path.startswith("/v1/"):
            if api_key is not None and request.headers.get("authorization") != \
                    f"Bearer {api_key}":
                return JSONResponse(APIError(401, "invalid or missing API key",
                                             kind="authentication_error",
                                             code="invalid_api_key").body(), status_code=401)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
                return JSONResponse(APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
                                    .body(), status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Any:
        if engine.dead is not None:
            return JSONResponse({"status": "engine down", "reason": engine.dead},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Any:
        from fastapi.responses import Response

        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "mistral-compile"}]}

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        if body.get("model") not in (None, model_name):
            raise APIError(404, f"model '{body.get('model')}' does not exist; this server has "
                           f"'{model_name}'", "model", code="model_not_found")
        if engine.waiting >= max_queue:
            raise APIError(503, "the queue is full; retry later", kind="server_error")
        return body

    def check(prompt: list[int], params: Any) -> None:
        try:
            engine.check_request(prompt, params)
        except MistralCompileError as err:
            raise APIError(400, str(err)) from None

    async def run(prompt: list[int], params: Any, n: int) -> AsyncIterator[tuple[int, Any]]:
        """Outputs of the n choices as they come: (index, RequestOutput)."""
        import asyncio

        queue: asyncio.Queue = asyncio.Queue()
        base = uuid.uuid4().hex

        async def one(index: int) -> None:
            p = params
            if n > 1 and params.seed is not None:
                import dataclasses

                p = dataclasses.replace(params, seed=params.seed + index)
            try:
                async for out in engine.generate(f"{base}-{index}", prompt, p):
                    await queue.put((index, out))
            except Exception as err:  # noqa: BLE001 (raised to the handler below)
                await queue.put((index, err))

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        done = 0
        start = time.perf_counter()
        last: dict[int, float] = {}
        metrics.prompt_tokens.inc(len(prompt) * n)
        try:
            while done < n:
                index, out = await queue.get()
                if isinstance(out, BaseException):
                    raise APIError(500, f"generation failed: {out}", kind="server_error")
                now = time.perf_counter()
                if index in last:
                    metrics.itl.observe(now - last[index])
                else:
                    metrics.ttft.observe(now - start)
                last[index] = now
                metrics.generation_tokens.inc()
                if out.finished:
                    done += 1
                yield index, out
        finally:
            for t in tasks:
                t.cancel()

    def usage(prompt: list[int], outs: list[RequestOutput]) -> dict[str, Any]:
        completion = sum(len(o.token_ids) for o in outs)
        return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                "total_tokens": len(prompt) + completion,
                "prompt_tokens_details": {"cached_tokens": max(o.cached_tokens for o in outs)}}

    def logprob_entries(out: RequestOutput, chat: bool) -> Any:
        tokenizer = engine.tokenizer
        entries = []
        for e in out.logprobs:
            token = tokenizer.decode([e["token"]], skip_special_tokens=False)
            top = [{"token": tokenizer.decode([i], skip_special_tokens=False), "logprob": v}
                   for i, v in e["top"]]
            entries.append({"token": token, "logprob": e["logprob"],
                            "bytes": list(token.encode()), "top_logprobs": top})
        if chat:
            return {"content": entries}
        tops = []
        for e in entries:  # the legacy format keys by text: tokens that decode alike keep the
            top: dict[str, float] = {}  # likeliest one's logprob
            for t in e["top_logprobs"]:
                top.setdefault(t["token"], t["logprob"])
            tops.append(top)
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries], "top_logprobs": tops}

    # Without a tokenizer (serve --random-weights) completions have no text: each choice and
    # each streamed chunk carries the new token ids instead ("token_ids", an extension), one
    # chunk per step, so a client still sees every token as it comes.
    raw_ids = not engine.has_tokenizer()

    async def respond(body: dict[str, Any], prompt: list[int], chat: bool):  # noqa: ANN202
        params, n = sampling(body, chat)
        check(prompt, params)  # before anything is sent: a bad request is a 400, not a stream
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        stamp = int(time.time())
        want_logprobs = params.logprobs is not None
        if not body.get("stream"):
            final: dict[int, RequestOutput] = {}
            async for index, out in run(prompt, params, n):
                if out.finished:
                    final[index] = out
            choices = []
            for i in range(n):
                out = final[i]
                choice: dict[str, Any] = {"index": i, "finish_reason": out.finish_reason,
                                          "logprobs": logprob_entries(out, chat)
                                          if want_logprobs else None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": out.text}
                else:
                    choice["text"] = out.text
                    if raw_ids:
                        choice["token_ids"] = out.token_ids
                choices.append(choice)
            return {"id": rid, "object": kind, "created": stamp, "model": model_name,
                    "choices": choices, "usage": usage(prompt, [final[i] for i in range(n)])}
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        async def events() -> AsyncIterator[str]:
            final: dict[int, RequestOutput] = {}
            sent_logprobs = [0] * n
            sent_tokens = [0] * n

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                return "data: " + json.dumps({"id": rid, "object": chunk_kind, "created": stamp,
                                              "model": model_name, "choices": choices,
                                              **extra}) + "\n\n"

            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None} for i in range(n)])
            try:
                async for index, out in run(prompt, params, n):
                    if out.finished:
                        final[index] = out
                    fresh_ids = out.token_ids[sent_tokens[index]:]
                    sent_tokens[index] += len(fresh_ids)
                    if not out.piece and not out.finished and not (raw_ids and fresh_ids):
                        continue
                    lp = None
                    if want_logprobs:
                        fresh = RequestOutput(out.request_id, [], logprobs=out.logprobs[
                            sent_logprobs[index]:])
                        sent_logprobs[index] = len(out.logprobs)
                        lp = logprob_entries(fresh, chat)
                    choice: dict[str, Any] = {"index": index, "logprobs": lp,
                                              "finish_reason": out.finish_reason}
                    if chat:
                        choice["delta"] = {"content": out.piece} if out.piece else {}
                    else:
                        choice["text"] = out.piece
                        if raw_ids:
                            choice["token_ids"] = fresh_ids
                    yield chunk([choice])
            except APIError as err:
                yield "data: " + json.dumps(err.body()) + "\n\n"
                return
            if include_usage:
                yield chunk([], usage=usage(prompt, [final[i] for i in range(n)]))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def encode(text_or_ids: Any, chat_messages: Any = None, tools: Any = None) -> list[int]:
        try:
            if chat_messages is not None:
                return engine.tokenizer.encode_chat(chat_messages, tools)
            if isinstance(text_or_ids, str):
                return engine.tokenizer.encode(text_or_ids)
        except MistralCompileError as err:
            raise APIError(400, str(err), "messages" if chat_messages is not None
                           else "prompt") from None
        return list(text_or_ids)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):  # noqa: ANN202
        body = await body_of(request)
        messages = messages_of(body)
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise APIError(400, "'tools' must be a list", "tools")
        return await respond(body, encode(None, messages, tools), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):  # noqa: ANN202
        body = await body_of(request)
        return await respond(body, encode(prompt_of(body)), chat=False)

    return app


class Metrics:
    """Prometheus metrics of one server: engine state at scrape time, counters, latencies."""

    def __init__(self, engine: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.engine = engine
        self.registry = registry = CollectorRegistry()
        prefix = "mistral_compile_"
        self.running = Gauge(prefix + "requests_running", "sequences in the batch",
                             registry=registry)
        self.waiting = Gauge(prefix + "requests_waiting", "sequences waiting for pages or room",
                             registry=registry)
        self.pages = Gauge(prefix + "kv_pages_in_use", "KV pages held by sequences",
                           registry=registry)
        self.pages_total = Gauge(prefix + "kv_pages", "KV pages in the pools", registry=registry)
        self.prefix_hits = Gauge(prefix + "prefix_cache_hit_tokens",
                                 "prompt tokens taken from the prefix cache (total)",
                                 registry=registry)
        self.preemptions = Gauge(prefix + "preemptions", "sequences preempted (total)",
                                 registry=registry)
        self.prompt_tokens = Counter(prefix + "prompt_tokens", "prompt tokens received",
                                     registry=registry)
        self.generation_tokens = Counter(prefix + "generation_tokens", "tokens generated",
                                         registry=registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram(prefix + "time_to_first_token_seconds", "time to first token",
                              buckets=buckets, registry=registry)
        self.itl = Histogram(prefix + "inter_token_latency_seconds", "time between tokens",
                             buckets=buckets, registry=registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        stats = self.engine.stats()
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.pages.set(stats["pages_in_use"])
        self.pages_total.set(stats["pages"])
        self.prefix_hits.set(stats["prefix_hit_tokens"])
        self.preemptions.set(stats["preemptions"])
        return generate_latest(self.registry)
