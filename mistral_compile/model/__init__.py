"""Model stage: the Mistral network in TVM Relax (tvm.relax.frontend.nn)."""

from mistral_compile.model.exports import attention_kinds
from mistral_compile.model.mistral import MistralForCausalLM

__all__ = ["MistralForCausalLM", "attention_kinds"]
