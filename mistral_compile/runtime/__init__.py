"""Runtime stage: the Engine (one sequence, chat) and LLM (batched) over a compiled library."""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "Engine", "EngineConfig", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # lazy: importing the runtime's light modules (tokenizer, sampling) must not import TVM
    if name == "Engine":
        from mistral_compile.runtime.engine import Engine

        return Engine
    if name in ("LLM", "EngineConfig"):
        from mistral_compile.runtime import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from mistral_compile.runtime.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
