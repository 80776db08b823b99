"""The CPU build's weight layout, applied to a model as a mutator: projections in panels."""

from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn

from mistral_compile.model.mistral import MistralForCausalLM, MistralLinear


class PanelLayout(nn.Mutator):
    """Store every projection whose rows divide into panels of ``panel`` in panels.

    ``layouts`` maps each parameter stored that way to its panel width: the library records it
    and the engine packs those weights at load (``cpu_kernels.pack_rows``); files on disk keep
    Hugging Face's [out, in] layout, whatever device a library is built for.
    """

    def __init__(self, panel: int) -> None:
        self.panel = panel
        self.layouts: dict[str, int] = {}

    def visit_module(self, name: str, node: nn.Module) -> Any:
        if isinstance(node, MistralLinear):
            for param in node.store_in_panels(self.panel):
                self.layouts[f"{name}.{param}"] = self.panel
            return node
        return super().visit_module(name, node)


def store_in_panels(model: MistralForCausalLM, panel: int) -> dict[str, int]:
    """Apply PanelLayout to ``model`` in place (a tied embedding too); name -> panel width."""
    mutator = PanelLayout(panel)
    mutator.visit("", model)
    if model.store_tied_embedding_in_panels(panel):
        mutator.layouts["model.embed_tokens.weight"] = panel
    return mutator.layouts
