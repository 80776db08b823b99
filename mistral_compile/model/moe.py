"""Mixtral's sparse mixture-of-experts block: the MLP of an MoE layer; names mirror HF."""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from mistral_compile.config import MistralConfig


class MixtralExperts(nn.Module):
    """Every expert's SiLU-gated MLP, stacked: gate and up fused per expert, as transformers 5.

    ``gate_up_proj`` is [E, 2I, H] (expert e's gate rows, then its up rows), ``down_proj``
    [E, H, I].
    """

    def __init__(self, config: MistralConfig) -> None:
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.intermediate_size = i
        self.gate_up_proj = nn.Parameter((e, 2 * i, h))
        self.down_proj = nn.Parameter((e, h, i))

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """sum_e weights[t, e] * expert_e(x[t]) for x [T, H], weights [T, E] (float32).

        Every expert runs on every token and the unchosen ones get weight 0: exact, and E / k
        times the work of reading only the chosen experts (the CUDA kernels of issue 21 will).
        """
        t, h = x.shape
        gate_up = op.matmul(op.reshape(x, (1, t, h)), op.permute_dims(self.gate_up_proj, [0, 2, 1]),
                            out_dtype="float32")  # [E, T, 2I]
        gate, up = op.split(gate_up, 2, axis=-1)
        act = (op.silu(gate) * up).astype(x.dtype)
        y = op.matmul(act, op.permute_dims(self.down_proj, [0, 2, 1]), out_dtype="float32")
        routed = y * op.unsqueeze(op.permute_dims(weights, [1, 0]), -1)  # [E, T, H]
        return op.sum(routed, axis=0).astype(x.dtype)


class MixtralSparseMoeBlock(nn.Module):
    """The router (softmax over all experts, the top k, renormalised) and the experts.

    As transformers computes it: router logits in the model's dtype, softmax in float32, the k
    largest probabilities divided by their sum; router jitter is a training knob, never applied.
    """

    def __init__(self, config: MistralConfig) -> None:
        from mistral_compile.model.mistral import MistralLinear  # noqa: PLC0415 (a cycle)

        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.gate = MistralLinear(config.hidden_size, config.num_local_experts)  # never q4
        self.experts = MixtralExperts(config)

    def routing_weights(self, x: Tensor) -> Tensor:
        """[T, E] float32: the renormalised probability of each chosen expert, 0 elsewhere."""
        t, h = x.shape
        logits = self.gate(op.reshape(x, (1, t, h)))  # the model's dtype, as HF's nn.Linear
        probs = op.softmax(op.reshape(logits, (t, self.num_experts)).astype("float32"), axis=-1)
        kth = op.topk(probs, self.top_k, axis=-1, ret_type="values", largest=True)
        threshold = op.min(kth, axis=-1, keepdims=True)
        chosen = op.where(op.greater_equal(probs, threshold), probs, op.zeros(probs.shape,
                                                                              "float32"))
        return chosen / op.sum(chosen, axis=-1, keepdims=True)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output for x [B, S, H]."""
        b, s, h = x.shape
        flat = op.reshape(x, (b * s, h))
        return op.reshape(self.experts(flat, self.routing_weights(flat)), (b, s, h))

    def add_to(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + self(x)`` (the dense MLP's interface)."""
        return residual + self(x)
