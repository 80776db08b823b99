"""The server's side of the engine process (serve/engine_core.py): requests out, deltas in.

``EngineProcess`` offers what ``AsyncEngine`` (the engine on a thread of the server's own
process) offers: ``generate``, ``check_request``, the tokenizer, ``stats``. A reader thread
receives each step's deltas in one message and hands them to the event loop in one call; the
loop folds them into per-request outputs and wakes the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import threading
from collections.abc import AsyncIterator
from typing import Any

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.llm import EngineConfig, RequestOutput
from mistral_compile.runtime.sampling import SamplingParams
from mistral_compile.serve.engine_core import Delta, run_core
from mistral_compile.serve.engine_loop import follow

logger = logging.getLogger("mistral_compile.serve")


class EngineProcess:
    """The LLM in a child process; this object lives in the server's event-loop process."""

    def __init__(self, model_dir: str, lib: str, device: str, engine_config: EngineConfig,
                 random_weights: bool = False, tokenizer: str | None = None,
                 progress: bool = True) -> None:
        """Start the engine process and wait until its model is loaded (errors: one line)."""
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state forked
        self._conn, child = ctx.Pipe()
        spec = {"model_dir": str(model_dir), "lib": str(lib), "device": device,
                "engine_config": engine_config, "random_weights": random_weights,
                "tokenizer": tokenizer, "progress": progress,
                "log_level": logging.getLogger().getEffectiveLevel()}
        # a daemon process may not start processes of its own, and a tensor-parallel
        # library's engine starts its other shards' (the count is the library's, known once
        # it loads): so it is not one; close() and its pipe closing end it
        self._process = ctx.Process(target=run_core, args=(child, spec), name="engine-core",
                                    daemon=False)
        self._process.start()
        child.close()
        try:
            kind, info = self._conn.recv()
        except EOFError:
            raise MistralCompileError("the engine process exited while loading the model "
                                      f"(exit code {self._process.exitcode})") from None
        if kind == "failed":
            self._process.join(timeout=10)
            raise MistralCompileError(info)
        self.limits = info["limits"]
        self._tokenizer_args = (info["model_dir"], info["tokenizer_record"], info["vocab_size"],
                                tokenizer)
        self._tokenizer: Any = None
        self._stats: dict[str, int] = info["stats"]
        self._send_lock = threading.Lock()
        self._outputs: dict[Any, RequestOutput] = {}
        self._subscribers: dict[Any, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.dead: str | None = None  # why the engine process is gone, once it is
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    # ---- what the app asks ----

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded here too (encoding and logprob text)."""
        if self._tokenizer is None:
            from mistral_compile.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(*self._tokenizer_args)
        return self._tokenizer

    def has_tokenizer(self) -> bool:
        return self.limits.has_tokenizer

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Refuse a request the engine cannot run (MistralCompileError), before sending it."""
        self.limits.check(prompt, params)

    def stats(self) -> dict[str, int]:
        """Running and waiting requests, KV pages, prefix hits, preemptions.

        As of the engine's last message: it reports after every step and every command.
        """
        return dict(self._stats)

    @property
    def waiting(self) -> int:
        return self.stats()["waiting"]

    @property
    def running(self) -> int:
        return self._stats["running"]

    # ---- requests ----

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    async def generate(self, request_id: Any, prompt: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The request's output after each step that changed it, until it finishes."""
        if self.dead is not None:
            raise MistralCompileError(f"the engine process is gone: {self.dead}")
        outputs: asyncio.Queue = asyncio.Queue()
        self._subscribers[request_id] = (asyncio.get_running_loop(), outputs)
        self._outputs[request_id] = RequestOutput(request_id, list(prompt))
        self._send(("add", request_id, list(prompt), params))

        def done(finished: bool) -> None:
            self._subscribers.pop(request_id, None)
            self._outputs.pop(request_id, None)
            if not finished and self.dead is None:
                self._send(("abort", request_id))

        async with contextlib.aclosing(follow(outputs, done)) as items:
            async for item in items:
                yield item

    def _apply(self, deltas: list[Delta]) -> None:
        """On the event loop: fold a step's deltas into the outputs, one snapshot per request."""
        for d in deltas:
            out = self._outputs.get(d.request_id)
            target = self._subscribers.get(d.request_id)
            if out is None or target is None:
                continue
            out.token_ids.extend(d.token_ids)
            out.logprobs.extend(d.logprobs)
            out.piece, out.finish_reason, out.cached_tokens = d.piece, d.finish_reason, \
                d.cached_tokens
            out.text = d.text if d.text is not None else out.text + d.piece
            target[1].put_nowait(dataclasses.replace(out, token_ids=list(out.token_ids),
                                                     logprobs=list(out.logprobs)))

    def _fail(self, request_id: Any, message: str) -> None:
        """On the event loop: a request (None: every request) gets the engine's error."""
        targets = list(self._subscribers) if request_id is None else [request_id]
        for rid in targets:
            target = self._subscribers.get(rid)
            if target is not None:
                target[1].put_nowait(MistralCompileError(message))

    def _post(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on each event loop that has requests (normally one)."""
        for loop in {loop for loop, _ in list(self._subscribers.values())}:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # that loop is closed
                pass

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                code = self._process.exitcode
                self.dead = f"it exited (code {code})" if code is not None else "it hung up"
                if code not in (0, None):
                    logger.error("the engine process died: %s", self.dead)
                self._post(self._fail, None, f"the engine process is gone: {self.dead}")
                return
            kind = message[0]
            if kind in ("step", "stats"):
                self._stats = message[-1]
            if kind == "step":
                self._post(self._apply, message[1])
            elif kind == "error":
                self._post(self._fail, message[1], message[2])

    def close(self) -> None:
        """Stop the engine process (its GPU memory is freed with it)."""
        if self._process.is_alive():
            try:
                self._send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(timeout=5)
        self._conn.close()
