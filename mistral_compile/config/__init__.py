"""Configuration stage: MistralConfig and its readers and writers."""

from mistral_compile.config.config import FULL_ATTENTION, MistralConfig
from mistral_compile.config.convert import convert_config
from mistral_compile.config.readers import (
    NORMALIZED_NAME,
    from_hf,
    from_mistral_params,
    load_source_config,
    read_config,
    resolve_source,
    write_config,
)

__all__ = [
    "FULL_ATTENTION",
    "NORMALIZED_NAME",
    "MistralConfig",
    "convert_config",
    "from_hf",
    "from_mistral_params",
    "load_source_config",
    "read_config",
    "resolve_source",
    "write_config",
]
