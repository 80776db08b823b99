"""The interactive chat loop behind `mistral-compile chat` (streaming, commands, Ctrl-C)."""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from typing import TextIO

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.engine import Engine
from mistral_compile.runtime.sampling import SamplingParams
from mistral_compile.runtime.textgen import Usage

HELP = """commands:
  /reset   forget the conversation (and the KV cache)
  /stats   speed of the last answer, cache use, window and sinks
  /help    this text
  /exit    leave (Ctrl-D too); Ctrl-C stops the current answer"""


def stats_text(engine: Engine, usage: Usage | None) -> str:
    """What /stats prints."""
    cfg = engine.config
    lines = []
    if usage is None:
        lines.append("no answer yet")
    else:
        lines.append(f"last turn: prompt {usage.prompt_tokens} tokens, prefilled "
                     f"{usage.prefilled_tokens} (the rest reused from the cache) at "
                     f"{usage.prefill_tokens_per_second:.1f} tok/s; {usage.completion_tokens} "
                     f"tokens generated at {usage.decode_tokens_per_second:.1f} tok/s "
                     f"(ended by {usage.finish_reason})")
    held = min(engine.length, engine.window - 1) if engine.per_sequence_window else engine.length
    lines.append(f"cache: sequence of {engine.length} tokens, {held} held, room for "
                 f"{engine.capacity} token slots")
    if engine.window > 0:
        lines.append(f"sliding window {engine.window}, attention sinks "
                     f"{engine.attention_sink_size}")
    else:
        lines.append(f"full attention, context window {cfg.context_window_size}")
    return "\n".join(lines)


def run_chat(engine: Engine, params: SamplingParams, system: str | None = None,
             out: TextIO = sys.stdout) -> int:
    """Read user turns from stdin and stream answers until /exit or EOF."""
    engine.tokenizer  # noqa: B018 - load it now so a missing tokenizer fails before the prompt
    window = (f"window {engine.window}, sinks {engine.attention_sink_size}" if engine.window > 0
              else f"context {engine.config.context_window_size}")
    print(f"mistral-compile chat: {engine.model_dir} on {engine.device} ({window}). "
          "/help for commands, Ctrl-D to leave.", file=out, flush=True)
    messages: list[dict] = []
    usage: Usage | None = None
    turn = 0
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to leave)", file=out, flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command in ("/exit", "/quit", "/bye"):
                return 0
            if command == "/reset":
                messages, usage = [], None
                engine.reset()
                print("(conversation reset)", file=out, flush=True)
            elif command == "/stats":
                print(stats_text(engine, usage), file=out, flush=True)
            elif command == "/help":
                print(HELP, file=out, flush=True)
            else:
                print(f"unknown command {command}; /help lists them", file=out, flush=True)
            continue
        messages.append({"role": "user", "content": line})
        conversation = ([{"role": "system", "content": system}] if system else []) + messages
        seed = None if params.seed is None else params.seed + turn
        turn += 1
        previous = signal.signal(signal.SIGINT, lambda *_: engine.interrupted.set())
        try:
            stream = engine.chat(conversation, **vars(replace(params, seed=seed)))
            for piece in stream:
                out.write(piece)
                out.flush()
        except MistralCompileError as err:
            messages.pop()
            print(f"\nerror: {err}", file=out, flush=True)
            continue
        finally:
            signal.signal(signal.SIGINT, previous)
        usage = stream.usage
        notes = {"interrupted": "[stopped]", "length": "[max tokens reached]",
                 "context": f"[context window full ({engine.config.context_window_size} tokens):"
                            " /reset to start over]"}
        print(f"\n{notes[usage.finish_reason]}" if usage.finish_reason in notes else "",
              file=out, flush=True)
        messages.append({"role": "assistant", "content": stream.text})
