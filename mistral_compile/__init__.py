"""mistral_compile: a TVM-based compiler and runtime for Mistral-family language models."""

from mistral_compile.config import MistralConfig
from mistral_compile.errors import ConfigError, MistralCompileError

__version__ = "0.1.0"

__all__ = ["ConfigError", "MistralCompileError", "MistralConfig", "__version__"]
