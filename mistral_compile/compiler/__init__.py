"""Compiler stage: lowering a converted model to a TVM library (see pipeline.py)."""
