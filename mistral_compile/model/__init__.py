"""Model stage: the Mistral network in TVM Relax (tvm.relax.frontend.nn)."""

from mistral_compile.model.mistral import MistralForCausalLM, attention_kinds

__all__ = ["MistralForCausalLM", "attention_kinds"]
