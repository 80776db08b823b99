"""Compiler stage: lowering a converted model to a TVM library."""

from mistral_compile.compiler.pipeline import PHASES, compile_model

__all__ = ["PHASES", "compile_model"]
