"""Weights stage: name maps, checkpoint reading, conversion into fused parameters."""

from mistral_compile.weights.convert import QUANTIZATIONS, convert_weight
from mistral_compile.weights.mapping import build_name_map

__all__ = ["QUANTIZATIONS", "build_name_map", "convert_weight"]
