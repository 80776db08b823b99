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
        MixtralSparseMoeBlock._decode). Hopper runs ``grouped`` instead.
        """
        t, h = x.shape
        gate_up_w, down_w = self.gate_up_proj.dense(), self.down_proj.dense()
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

    def tensor_cores(self, x: Tensor) -> bool:
        """Whether ``grouped`` applies: sm_90, float16, H and I multiples of 64."""
        return (kernels.on_cuda() and x.dtype == "float16"
                and kernels.wgmma_supported(x.shape[1], "float16")
                and kernels.wgmma_supported(self.intermediate_size, "float16"))

    def grouped(self, x: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        """The chosen experts only, on the tensor cores: x [T, H] float16, top k [T, k].

        The (token, expert) pairs are laid out expert by expert, each expert's run padded to a
        128-row tile (kernels.moe_align); the tokens are gathered in that order; gate_up (silu
        epilogue, float16 as the dense MLP) and down (float32) run as grouped GEMMs, each tile
        on its expert's weight rows; each token sums its k rows weighted by their renormalised
        probabilities, in float32 (kernels.moe_combine).
        """
        t, h = x.shape
        k, e_count, i = indices.shape[1], self.gate_up_proj.shape[0], self.intermediate_size
        gate_up_w, down_w = self.gate_up_proj.dense(), self.down_proj.dense()
        m = kernels.moe_rows(t, e_count, k)
        rows, tiles, where = op.tensor_ir_op(
            kernels.moe_align(e_count), "moe_align", args=[op.reshape(indices, (t * k,))],
            out=[Tensor.placeholder((m,), "int32"),
                 Tensor.placeholder((tirx.floordiv(m, kernels.WG_BM),), "int32"),
                 Tensor.placeholder((t * k,), "int32")])
        xs = op.tensor_ir_op(kernels.moe_gather(h, k), "moe_gather", args=[x, rows],
                             out=Tensor.placeholder((1, m, h), "float16"))
        act = op.tensor_ir_op(kernels.gemm_wgmma_grouped(2 * i, h, e_count, "float16", "silu"),
                              "experts_gate_up", args=[xs, gate_up_w, tiles],
                              out=Tensor.placeholder((1, m, i), "float16"))
        y = op.tensor_ir_op(kernels.gemm_wgmma_grouped(h, i, e_count, "float32"),
                            "experts_down", args=[act, down_w, tiles],
                            out=Tensor.placeholder((1, m, h), "float32"))
        return op.tensor_ir_op(kernels.moe_combine(h, k, x.dtype), "moe_combine",
                               args=[y, where, op.reshape(values, (t * k,))],
                               out=Tensor.placeholder((t, h), x.dtype))


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

    def probabilities(self, x: Tensor) -> Tensor:
        """[T, E] float32: the router's softmax over every expert for x [T, H]."""
        t, h = x.shape
        logits = self.gate(op.reshape(x, (1, t, h)))  # the model's dtype, as HF's nn.Linear
        return op.softmax(op.reshape(logits, (t, self.num_experts)).astype("float32"), axis=-1)

    def routing_weights(self, x: Tensor) -> Tensor:
        """[T, E] float32: the renormalised probability of each chosen expert, 0 elsewhere."""
        probs = self.probabilities(x)
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
        if self.experts.tensor_cores(flat):
            values, indices = self.choose(flat)
            return op.reshape(self.experts.grouped(flat, values, indices), (b, s, h))
        return op.reshape(self.experts(flat, self.routing_weights(flat)), (b, s, h))

    def choose(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's k chosen experts, on the device: (probabilities, indices), both [T, k].

        The probabilities are renormalised over the k (float32); the indices are int32.
        """
        values, indices = op.topk(self.probabilities(x), self.top_k, axis=-1, ret_type="both",
                                  largest=True, dtype="int32")
        return values / op.sum(values, axis=-1, keepdims=True), indices

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
        values, indices = self.choose(x)
        weights = op.reshape(values, (k, 1))
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
