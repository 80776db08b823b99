"""The engine process of ``serve``: owns the LLM and the GPU, steps it, streams deltas back.

vLLM V1's split: the HTTP server's event loop (JSON, SSE, sockets) and the engine's host work
(scheduling, uploads, sampling) each get a process and a GIL of their own. Messages on the pipe:
- in: ("add", request_id, prompt, params), ("abort", request_id), ("stop",);
- out: ("ready", info) once the model is loaded, or ("failed", message); then after each step
  ("step", deltas, stats), after commands that changed the state without a step ("stats",
  stats), and ("error", request_id or None, message) for a refused request or a failed step.
A delta carries only what the step added to a request (``Delta``), so a message's size does
not grow with the length of the answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("mistral_compile.serve")


@dataclass
class Delta:
    """What one step added to a request's output."""

    request_id: Any
    token_ids: list[int]
    piece: str
    logprobs: list[dict]
    finish_reason: str | None
    cached_tokens: int
    text: str | None  # the whole text, with the last delta of a finished request


def engine_stats(llm: Any) -> dict[str, int]:
    """What the server's metrics report of an LLM."""
    s = llm.stats()
    return {"running": s["running"], "waiting": s["waiting"],
            "pages_in_use": sum(p.in_use for p in llm.kv.pools),
            "pages": sum(p.num_pages for p in llm.kv.pools),
            "prefix_hit_tokens": llm.kv.hit_tokens, "preemptions": s["preemptions"]}


def _load(spec: dict[str, Any]) -> Any:
    from mistral_compile.runtime.llm import LLM

    params = None
    if spec["random_weights"]:
        from mistral_compile.runtime.bench import make_random_weights

        params = make_random_weights(spec["lib"], spec["device"])
    return LLM(spec["model_dir"], spec["lib"], spec["device"], spec["engine_config"],
               params=params, progress=spec["progress"], tokenizer=spec["tokenizer"])


def run_core(conn: Any, spec: dict[str, Any]) -> None:
    """The engine process's main: load the model from ``spec``, then serve ``conn``.

    It ends on ("stop",), or when the server's end of the pipe closes (the server exited, for
    example on a signal, without saying so).
    """
    logging.basicConfig(level=spec["log_level"], format="[%(name)s] %(message)s")  # as the CLI
    try:
        llm = _load(spec)
    except Exception as err:  # noqa: BLE001 - the server reports it in one line and exits
        conn.send(("failed", str(err) or type(err).__name__))
        return
    try:
        _serve(conn, llm)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("the server went away: the engine process ends")


def _serve(conn: Any, llm: Any) -> None:
    """Say ready, then take commands and step until told to stop."""
    art = llm.artifact
    conn.send(("ready", {"limits": llm.limits, "model_dir": art.model_dir,
                         "tokenizer_record": art.tokenizer_record,
                         "vocab_size": llm.config.vocab_size, "stats": engine_stats(llm)}))
    sent: dict[Any, int] = {}  # request id -> tokens already sent
    logprobs_sent: dict[Any, int] = {}
    while True:
        changed = False
        while conn.poll(None if not llm.has_unfinished() and not changed else 0):
            command = conn.recv()
            changed = True
            if command[0] == "stop":
                return
            rid = command[1]
            if command[0] == "add":
                try:
                    llm.add_request(rid, command[2], command[3])
                    sent[rid] = logprobs_sent[rid] = 0
                except Exception as err:  # noqa: BLE001 - that request's error
                    conn.send(("error", rid, str(err) or type(err).__name__))
            else:
                llm.abort(rid)
                llm.outputs.pop(rid, None)
                sent.pop(rid, None)
                logprobs_sent.pop(rid, None)
        if not llm.has_unfinished():
            conn.send(("stats", engine_stats(llm)))
            continue
        try:
            outs = llm.step()
        except Exception as err:  # noqa: BLE001 - every running request gets the error
            logger.exception("engine step failed")
            conn.send(("error", None, str(err) or type(err).__name__))
            for rid in list(sent):
                llm.abort(rid)
                llm.outputs.pop(rid, None)
            sent.clear()
            logprobs_sent.clear()
            continue
        deltas = []
        for out in outs:
            rid = out.request_id
            if rid not in sent:
                continue
            deltas.append(Delta(rid, out.token_ids[sent[rid]:], out.piece,
                                out.logprobs[logprobs_sent[rid]:], out.finish_reason,
                                out.cached_tokens, out.text if out.finished else None))
            sent[rid], logprobs_sent[rid] = len(out.token_ids), len(out.logprobs)
            if out.finished:
                llm.outputs.pop(rid, None)
                del sent[rid], logprobs_sent[rid]
        conn.send(("step", deltas, engine_stats(llm)))
