"""Mixtral's sparse mixture-of-experts block: the MLP of an MoE layer; names mirror HF."""

from __future__ import annotations

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from mistral_compile.config import MistralConfig
from mistral_compile.model import kernels, quant
from mistral_compile.weights.quantize import GROUP, PER_WORD, Q4_FORMATS, quantizable


class StackedWeight(nn.Module):
    """One stacked expert weight [E, R, C]: float ``weight``, or 4-bit per expert.

    With q4f16_1 / q4f16_2 each expert's [R, C] is quantized as a dense projection's weight
    (weights/quantize.py): ``q_weight`` [E, R, C / 8], ``q_scale`` (and ``q_min``) [E, R, C / 32].
    """

    def __init__(self, experts: int, rows: int, cols: int, quantization: str | None) -> None:
        self.shape = (experts, rows, cols)
        self.quantized = quantization in Q4_FORMATS and quantizable(self.shape)
        self.quantization = quantization
        self.with_min = self.quantized and quantization == "q4f16_2"
        if self.quantized:
            self.q_weight = nn.Parameter((experts, rows, cols // PER_WORD), dtype="uint32")
            self.q_scale = nn.Parameter((experts, rows, cols // GROUP), dtype="float16")
            if self.with_min:
                self.q_min = nn.Parameter((experts, rows, cols // GROUP), dtype="float16")
        else:
            self.weight = nn.Parameter(self.shape)

    def to(self, dtype: str | None = None) -> None:  # noqa: D102 (nn.Module API)
        if not self.quantized:  # the packed codes and their float16 scales keep their dtypes
            super().to(dtype)

    def stored(self) -> list[Tensor]:
        """The stored operands: [weight], or [q_weight, q_scale(, q_min)]."""
        if not self.quantized:
            return [self.weight]
        return [self.q_weight, self.q_scale] + ([self.q_min] if self.with_min else [])

    def dense(self) -> Tensor:
        """The weight [E, R, C]: float16 when 4-bit (dequantized), else as stored."""
        if not self.quantized:
            return self.weight
        args = [self.q_weight, self.q_scale] + ([self.q_min] if self.with_min else [])
        return op.tensor_expr_op(quant.dequantize, "dequantize_experts", args)


class MixtralExperts(nn.Module):
    """Every expert's SiLU-gated MLP, stacked: gate and up fused per expert, as transformers 5.

    ``gate_up_proj`` is [E, 2I, H] (expert e's gate rows, then its up rows), ``down_proj``
    [E, H, I].
    """

    def __init__(self, config: MistralConfig, quantization: str | None = None) -> None:
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.intermediate_size = i
        self.gate_up_proj = StackedWeight(e, 2 * i, h, quantization)
        self.down_proj = StackedWeight(e, h, i, quantization)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """sum_e weights[t, e] * expert_e(x[t]) for x [T, H], weights [T, E] (float32).

        Every expert runs on every token and the unchosen ones get weight 0: exact, and E / k
        times the work of reading only the chosen experts (what one token's step does on CUDA:
        MixtralSparseMoeBlock._decode). On Hopper each expert runs on the tensor cores.
        """
        t, h = x.shape
        gate_up_w, down_w = self.gate_up_proj.dense(), self.down_proj.dense()
        if self._tensor_cores(x, h):
            return self._per_expert(x, weights, gate_up_w, down_w)
        xs = op.reshape(x, (1, t, h))
        if gate_up_w.dtype != x.dtype:  # 4-bit: float16 weights against a float32 model
            xs = xs.astype(gate_up_w.dtype)
        gate_up = op.matmul(xs, op.permute_dims(gate_up_w, [0, 2, 1]),
                            out_dtype="float32")  # [E, T, 2I]
        gate, up = op.split(gate_up, 2, axis=-1)
        act = (op.silu(gate) * up).astype(down_w.dtype)
        y = op.matmul(act, op.permute_dims(down_w, [0, 2, 1]), out_dtype="float32")
        routed = y * op.unsqueeze(op.permute_dims(weights, [1, 0]), -1)  # [E, T, H]
        return op.sum(routed, axis=0).astype(x.dtype)


    def _tensor_cores(self, x: Tensor, h: int) -> bool:
        """Whether the experts run on mc::gemm_wgmma (sm_90, float16, K multiples of 64)."""
        return (kernels.on_cuda() and x.dtype == "float16"
                and kernels.wgmma_supported(h, "float16")
                and kernels.wgmma_supported(self.intermediate_size, "float16"))

    def _per_expert(self, x: Tensor, weights: Tensor, gate_up_w: Tensor,
                    down_w: Tensor) -> Tensor:
        """Each expert over every token on the tensor cores, weighted and summed in float32.

        Expert e: silu(x gate_e^T) * (x up_e^T) (the GEMM's silu epilogue, float16 as the
        dense MLP), then its down projection in float32 times the routing weights' column e.
        """
        t, h = x.shape
        e_count, i = self.gate_up_proj.shape[0], self.intermediate_size
        xs = op.reshape(x, (1, t, h))
        columns = op.split(weights, e_count, axis=1)  # [T, 1] each
        out = None
        for e in range(e_count):
            index = tirx.IntImm("int32", e)
            act = op.tensor_ir_op(kernels.gemm_wgmma_expert(2 * i, h, e_count, "float16", "silu"),
                                  "expert_gate_up", args=[xs, gate_up_w, index],
                                  out=Tensor.placeholder((1, t, i), "float16"))
            y = op.tensor_ir_op(kernels.gemm_wgmma_expert(h, i, e_count, "float32"),
                                "expert_down", args=[act, down_w, index],
                                out=Tensor.placeholder((1, t, h), "float32"))
            term = y * op.reshape(columns[e], (1, t, 1))
            out = term if out is None else out + term
        return op.reshape(out, (t, h)).astype(x.dtype)


class MixtralSparseMoeBlock(nn.Module):
    """The router (softmax over all experts, the top k, renormalised) and the experts.

    As transformers computes it: router logits in the model's dtype, softmax in float32, the k
    largest probabilities divided by their sum; router jitter is a training knob, never applied.
    """

    def __init__(self, config: MistralConfig, gate: nn.Module,
                 quantization: str | None = None) -> None:
        """``gate``: the router, a float projection hidden -> experts ([1, T, H] -> [1, T, E]).

        The decoder layer makes it (a MistralLinear, never 4-bit: a few thousand numbers that
        decide every expert choice), so this file needs nothing of model/mistral.py.
        """
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.gate = gate
        self.experts = MixtralExperts(config, quantization)

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
        if isinstance(b, int) and isinstance(s, int) and b * s == 1 and self._decode_kernels(x):
            return op.reshape(self._decode(op.reshape(x, (1, h))), (b, s, h))
        flat = op.reshape(x, (b * s, h))
        return op.reshape(self.experts(flat, self.routing_weights(flat)), (b, s, h))

    def _decode_kernels(self, x: Tensor) -> bool:
        """Whether one token's experts run on mc::gemv_expert (CUDA, shapes our GEMV takes)."""
        ex = self.experts
        return (kernels.on_cuda() and x.dtype in kernels.CTYPES
                and all(kernels.gemv_supported(w.shape[2], "float16" if w.quantized else x.dtype)
                        for w in (ex.gate_up_proj, ex.down_proj)))

    def _decode(self, x: Tensor) -> Tensor:
        """One token [1, H]: only the k chosen experts' rows are read (mc::gemv_expert).

        The router and its top k run on the device; the experts' outputs are weighted by their
        renormalised probabilities, as in ``routing_weights``.
        """
        h, k, ex = x.shape[1], self.top_k, self.experts
        i, e = ex.intermediate_size, self.num_experts
        logits = self.gate(op.reshape(x, (1, 1, h)))
        probs = op.softmax(op.reshape(logits, (1, e)).astype("float32"), axis=-1)
        values, indices = op.topk(probs, k, axis=-1, ret_type="both", largest=True,
                                  dtype="int32")
        weights = op.reshape(values / op.sum(values, axis=-1, keepdims=True), (k, 1))
        idx = op.reshape(indices, (k,))

        def run(w: StackedWeight, rows: int, cols: int, inp: Tensor, mode: str, shared: bool,
                out_dtype: str) -> Tensor:
            q4 = w.quantization if w.quantized else None
            func = kernels.gemv_experts(rows, cols, e, k, x.dtype, out_dtype, mode, shared, q4)
            operands = w.stored()
            if w.quantized and not w.with_min:  # one kernel signature: scales stand in (unread)
                operands.append(w.q_scale)
            return op.tensor_ir_op(func, f"gemv_expert_{mode}", args=[inp, idx, *operands],
                                   out=Tensor.placeholder((k, rows), out_dtype))

        act = run(ex.gate_up_proj, i, h, x, "silu", True, x.dtype)  # [k, I]
        y = run(ex.down_proj, h, i, act, "plain", False, "float32")  # [k, H]
        return op.reshape(op.sum(y * weights, axis=0).astype(x.dtype), (1, h))

    def add_to(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + self(x)`` (the dense MLP's interface)."""
        return residual + self(x)
