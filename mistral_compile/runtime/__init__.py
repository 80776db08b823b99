"""Runtime stage: the Engine that runs a compiled library with converted weights."""

from mistral_compile.runtime.engine import Engine

__all__ = ["Engine"]
