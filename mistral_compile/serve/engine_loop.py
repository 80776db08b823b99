"""The engine on a thread of the server's process (``serve --engine-thread``; tests, embedding).

``serve`` runs the engine in a process of its own (serve/engine_process.py); both offer the app
the same interface: ``generate``, ``check_request``, ``tokenizer``, ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from mistral_compile.runtime.llm import LLM, RequestOutput
from mistral_compile.runtime.sampling import SamplingParams
from mistral_compile.serve.engine_core import engine_stats

logger = logging.getLogger("mistral_compile.serve")


async def follow(outputs: asyncio.Queue,
                 done: Callable[[bool], None]) -> AsyncIterator[RequestOutput]:
    """A request's outputs from its queue until it finishes (an exception in it is raised).

    ``done(finished)`` runs however it ends: finished, failed, or left by its consumer (a
    client that disconnected), which is when the engine must abort the request.
    """
    finished = False
    try:
        while not finished:
            item = await outputs.get()
            if isinstance(item, BaseException):
                raise item
            finished = item.finished
            yield item
    finally:
        done(finished)


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for outputs, item in batch:
        outputs.put_nowait(item)


class AsyncEngine:
    """Runs ``llm.step()`` on its own thread while requests are running.

    Requests are added and aborted through a command queue drained between steps, so the LLM is
    only ever touched by that thread. Each step's outputs go to the requests' asyncio queues as
    snapshots (copies); a request whose consumer goes away (client disconnect) is aborted, its
    pages freed before the next step.
    """

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._subscribers: dict[Any, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    dead: str | None = None  # the thread engine lives as long as the server

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    def has_tokenizer(self) -> bool:
        return self.llm.has_tokenizer()

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        self.llm.check_request(prompt, params)

    def stats(self) -> dict[str, int]:
        return engine_stats(self.llm)

    @property
    def waiting(self) -> int:
        return len(self.llm.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.llm.scheduler.running)

    async def generate(self, request_id: Any, prompt: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The request's output after each step that changed it, until it finishes."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(("add", request_id, prompt, params, loop, outputs))
        self._wake.set()

        def done(finished: bool) -> None:
            if not finished:
                self._commands.put(("abort", request_id))
                self._wake.set()

        async with contextlib.aclosing(follow(outputs, done)) as items:
            async for item in items:
                yield item

    def _deliver(self, request_id: Any, item: Any) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[Any, Any]]) -> None:
        """Hands items to their requests' queues, waking each event loop once.

        One wake-up per item would write the loop's wake-up pipe 64 times for a step of 64.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            target = self._subscribers.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the event loop is closed
                for request_id, _ in items:
                    if self._subscribers.get(request_id, (None,))[0] is loop:
                        self._subscribers.pop(request_id, None)

    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, rid, prompt, params, loop, outputs = command
                self._subscribers[rid] = (loop, outputs)
                try:
                    self.llm.add_request(rid, prompt, params)
                except Exception as err:  # noqa: BLE001 (reported to the request)
                    self._deliver(rid, err)
                    self._subscribers.pop(rid, None)
            else:
                rid = command[1]
                self.llm.abort(rid)
                self.llm.outputs.pop(rid, None)
                self._subscribers.pop(rid, None)

    def _run(self) -> None:
        while not self._stop:
            self._drain()
            if not self.llm.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                changed = self.llm.step()
            except Exception as err:  # noqa: BLE001 (every running request gets the error)
                logger.exception("engine step failed")
                for rid in list(self._subscribers):
                    self._deliver(rid, err)
                    self.llm.abort(rid)
                    self.llm.outputs.pop(rid, None)
                self._subscribers.clear()
                continue
            self._deliver_all([(out.request_id, dataclasses.replace(
                out, token_ids=list(out.token_ids), logprobs=list(out.logprobs),
                token_times=list(out.token_times[-2:]))) for out in changed])
            for out in changed:
                if out.finished:
                    self._subscribers.pop(out.request_id, None)
                    self.llm.outputs.pop(out.request_id, None)
