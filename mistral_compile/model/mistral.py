"""The Mistral decoder in tvm.relax.frontend.nn with a paged KV cache; names mirror HF."""

from __future__ import annotations

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from mistral_compile.config import MistralConfig
from mistral_compile.model import cpu_kernels, kernels, quant, sampler
from mistral_compile.model.exports import module_spec, paged_kv_cache
from mistral_compile.model.kv_owned import KVState, OwnedKVCache, argmax_advance
from mistral_compile.model.kv_paged import PagedCache
from mistral_compile.model.moe import MixtralSparseMoeBlock
from mistral_compile.weights.quantize import (
    GROUP,
    PER_WORD,
    Q4_FORMATS,
    quantizable,
    quantized_shapes,
)


class MistralLinear(nn.Module):
    """A bias-free projection ``x @ W.T`` (W is [out, in]) accumulated in float32.

    TVM's matmul accumulates in its output dtype, and float16 sums over 4096-14336 products
    were 20x less accurate than Hugging Face's (cuBLAS accumulates in float32). With
    ``quantization="q4f16_1"`` W is held as ``q_weight``/``q_scale``, with ``"q4f16_2"`` also
    ``q_min`` (weights/quantize.py). On
    CUDA a batch-1 decode input goes through our GEMV kernels (model/kernels.py); elsewhere the
    weight is dequantized to float16 first. ``store_in_panels`` (a CPU build's layout, see
    model/cpu_layout.py) puts the weight in panels for our CPU kernels (model/cpu_kernels.py).
    """

    def __init__(self, in_features: int, out_features: int, quantization: str | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.panel = 0  # rows per panel when the weight is stored in panels (CPU), else 0
        self.quantized = quantization in Q4_FORMATS and quantizable((out_features, in_features))
        self.with_min = self.quantized and quantization == "q4f16_2"  # w = q * scale + min
        if self.quantized:
            w_shape, s_shape = quantized_shapes(out_features, in_features)
            self.q_weight = nn.Parameter(w_shape, dtype="uint32")
            self.q_scale = nn.Parameter(s_shape, dtype="float16")
            if self.with_min:
                self.q_min = nn.Parameter(s_shape, dtype="float16")
        else:
            self.weight = nn.Parameter((out_features, in_features))

    def to(self, dtype: str | None = None) -> None:  # noqa: D102 (nn.Module API)
        if not self.quantized:  # the packed weight and its float16 scales keep their dtypes
            super().to(dtype)

    def store_in_panels(self, panel: int) -> list[str]:
        """Declare the weight(s) as panels [out / P, in (or words, groups), P]; their names."""
        n, k = self.out_features, self.in_features
        if not cpu_kernels.packable(n, k, panel):
            return []
        self.panel = panel
        if not self.quantized:
            self.weight = nn.Parameter((n // panel, k, panel), dtype=self.weight.dtype)
            return ["weight"]
        self.q_weight = nn.Parameter((n // panel, k // PER_WORD, panel), dtype="uint32")
        self.q_scale = nn.Parameter((n // panel, k // GROUP, panel), dtype="float16")
        if not self.with_min:
            return ["q_weight", "q_scale"]
        self.q_min = nn.Parameter((n // panel, k // GROUP, panel), dtype="float16")
        return ["q_weight", "q_scale", "q_min"]

    def q4_params(self) -> list[Tensor]:
        """The quantized weight's tensors: codes, scales (and minimums)."""
        return [self.q_weight, self.q_scale] + ([self.q_min] if self.with_min else [])

    def _q4_cpu_args(self) -> list[Tensor]:
        """codes, scales, minimums for the CPU kernels (q4f16_1: the scales stand for them)."""
        return [self.q_weight, self.q_scale, self.q_min if self.with_min else self.q_scale]

    def _panels(self, x: Tensor, out_dtype: str) -> Tensor:
        """``x @ W.T``, W in panels: the GEMM kernel (decode: its m = 1 case, or the q4 GEMV)."""
        n, k, panel = self.out_features, self.in_features, self.panel
        b, s, _ = x.shape
        flat = op.reshape(x, (b * s, k))
        if self.quantized and _static(x.shape) == [1, 1, k]:
            gemv = cpu_kernels.gemv_q4_packed(n, k, panel, x.dtype, out_dtype, self.with_min)
            y = op.tensor_ir_op(gemv, "gemv_q4_cpu", args=[flat, *self._q4_cpu_args()],
                                out=Tensor.placeholder((1, n), out_dtype))
            return op.reshape(y, (b, s, n))
        if not self.quantized:
            weight = self.weight
        else:
            weight = op.tensor_ir_op(cpu_kernels.dequantize_q4_packed(n, k, panel,
                                                                      self.with_min),
                                     "dequantize_q4_cpu", args=self._q4_cpu_args(),
                                     out=Tensor.placeholder((n // panel, k, panel), "float32"))
        tile = cpu_kernels.cpu_tile()
        gemm = cpu_kernels.gemm_packed(n, k, panel, tile[1], x.dtype, weight.dtype, out_dtype)
        y = op.tensor_ir_op(gemm, "gemm_cpu", args=[flat, weight],
                            out=Tensor.placeholder((b * s, n), out_dtype))
        return op.reshape(y, (b, s, n))

    def forward(self, x: Tensor, out_dtype: str | None = None) -> Tensor:
        out_dtype = out_dtype or x.dtype
        if self.panel:
            return self._panels(x, out_dtype)
        if not self.quantized:
            return project(x, self.weight, out_dtype)
        n, k = self.out_features, self.in_features
        if _decode_gemv(x, k, "float16"):
            return op.tensor_ir_op(kernels.gemv_q4(n, k, out_dtype, with_min=self.with_min),
                                   "gemv_q4", args=[x, x, *self.q4_params()],
                                   out=Tensor.placeholder((1, 1, n), out_dtype))
        if self._q4_gemm(x):
            b, s, _ = x.shape
            return op.tensor_ir_op(kernels.gemm_q4(n, k, out_dtype, "plain", self.with_min),
                                   "gemm_q4", args=[x, *self._q4_gemm_params()],
                                   out=Tensor.placeholder((b, s, n), out_dtype))
        return project(x, self._dense(x.dtype), out_dtype)

    def _q4_gemm(self, x: Tensor) -> bool:
        """Whether kernels.gemm_q4 takes this 4-bit weight (Hopper, float16, K % 128 == 0)."""
        return (self.quantized and x.dtype == "float16" and self.in_features % 128 == 0
                and kernels.wgmma_supported(self.in_features, x.dtype)
                and kernels.gemm_supported(self.out_features, self.in_features, x.dtype))

    def _q4_gemm_params(self) -> list[Tensor]:
        """Codes, scales, minimums for gemm_q4 (q4f16_1: the scales stand for the minimums)."""
        return [self.q_weight, self.q_scale, self.q_min if self.with_min else self.q_scale]

    def _dense(self, dtype: str) -> Tensor:
        """The weight as a dense [out, in] tensor (q4f16_*: dequantized, by our kernel on CUDA)."""
        if not self.quantized:
            return self.weight
        if kernels.on_cuda():
            n, k = self.out_features, self.in_features
            dense = op.tensor_ir_op(kernels.dequantize_q4(n, k, self.with_min), "dequantize_q4",
                                    args=self.q4_params(),
                                    out=Tensor.placeholder((n, k), "float16"))
        else:
            dense = op.tensor_expr_op(quant.dequantize, "dequantize", self.q4_params())
        return _to(dense, dtype)

    def gemm_epilogue(self, x: Tensor, epilogue: str, *extra: Tensor) -> Tensor | None:
        """Hopper GEMM with a fused epilogue (kernels.gemm_wgmma), None where it does not apply."""
        n, k = self.out_features, self.in_features
        if (not kernels.wgmma_supported(k, x.dtype) or not kernels.gemm_supported(n, k, x.dtype)
                or _decode_gemv(x, k, x.dtype) or any(e.dtype != x.dtype for e in extra)):
            return None
        b, s, _ = x.shape
        out = n // 2 if epilogue == "silu" else n
        if self._q4_gemm(x):
            return op.tensor_ir_op(kernels.gemm_q4(n, k, x.dtype, epilogue, self.with_min),
                                   f"gemm_q4_{epilogue}",
                                   args=[x, *self._q4_gemm_params(), *extra],
                                   out=Tensor.placeholder((b, s, out), x.dtype))
        return op.tensor_ir_op(kernels.gemm_wgmma(n, k, x.dtype, epilogue), f"gemm_{epilogue}",
                               args=[x, self._dense(x.dtype), *extra],
                               out=Tensor.placeholder((b, s, out), x.dtype))

    def add_to(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + self(x)``, the add in the GEMM's epilogue where gemm_wgmma applies."""
        fused = self.gemm_epilogue(x, "residual", residual)
        return residual + self(x) if fused is None else fused

    def takes_fused_decode(self, dtype: str) -> bool:
        """Whether ``fused`` applies: CUDA, and our GEMV takes this weight and input dtype."""
        weight_dtype = "float16" if self.quantized else self.weight.dtype
        return kernels.on_cuda() and dtype == weight_dtype and \
            kernels.gemv_supported(self.in_features, dtype)

    def fused(self, x: Tensor, mode: str, aux: Tensor, eps: float = 0.0) -> Tensor:
        """Batch-1 decode GEMV with a neighbouring kernel fused in (kernels.gemv's modes)."""
        n, k = self.out_features, self.in_features
        if self.quantized:
            func = kernels.gemv_q4(n, k, x.dtype, mode, eps, self.with_min)
            args = [x, aux, *self.q4_params()]
        else:
            func, args = kernels.gemv(n, k, x.dtype, x.dtype, mode, eps), [x, aux, self.weight]
        outputs = kernels.gemv_shapes(n, k, mode)[1]
        return op.tensor_ir_op(func, f"gemv_{mode}", args=args,
                               out=Tensor.placeholder((1, 1, outputs), x.dtype))


def project(x: Tensor, weight: Tensor, out_dtype: str) -> Tensor:
    """``x @ weight.T`` in ``out_dtype``, accumulated in float32 (see MistralLinear)."""
    n, k = weight.shape
    if (cpu_kernels.on_cpu() and _static(x.shape) == [1, 1, k]
            and cpu_kernels.gemv_rows_supported(n, k)):
        y = op.tensor_ir_op(cpu_kernels.gemv_rows(n, k, x.dtype, weight.dtype, out_dtype),
                            "gemv_rows_cpu", args=[op.reshape(x, (1, k)), weight],
                            out=Tensor.placeholder((1, n), out_dtype))
        return op.reshape(y, (1, 1, n))
    if _decode_gemv(x, k, weight.dtype):
        return op.tensor_ir_op(kernels.gemv(n, k, x.dtype, out_dtype), "gemv",
                               args=[x, x, weight],
                               out=Tensor.placeholder((1, 1, n), out_dtype))
    if kernels.on_cuda() and x.dtype == weight.dtype and kernels.gemm_supported(n, k, x.dtype):
        b, s, _ = x.shape
        gemm = kernels.gemm_wgmma(n, k, out_dtype) if kernels.wgmma_supported(k, x.dtype) \
            else kernels.gemm(n, k, out_dtype)
        return op.tensor_ir_op(gemm, "gemm", args=[x, weight],
                               out=Tensor.placeholder((b, s, n), out_dtype))
    return _to(op.matmul(x, op.permute_dims(weight), out_dtype="float32"), out_dtype)


def _static(shape: list) -> list[int | None]:
    """A shape's static dimensions (None for symbolic ones)."""
    return [d if isinstance(d, int) else None for d in shape]


def _decode_gemv(x: Tensor, in_features: int, weight_dtype: str) -> bool:
    """A CUDA batch-1 decode input that our GEMV kernels take (else the generic matmul)."""
    return (kernels.on_cuda() and x.dtype == weight_dtype
            and [d if isinstance(d, int) else None for d in x.shape] == [1, 1, in_features]
            and kernels.gemv_supported(in_features, x.dtype))


def _to(x: Tensor, dtype: str) -> Tensor:
    return x if x.dtype == dtype else x.astype(dtype)


class MistralRMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as Hugging Face's MistralRMSNorm does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        self.weight = nn.Parameter((hidden_size,))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.shape[-1]  # our kernel on CUDA; else one TE kernel (op.rms_norm: 3 launches)
        if x.dtype == self.weight.dtype and kernels.rms_norm_supported(h, x.dtype):
            return op.tensor_ir_op(kernels.rms_norm(h, x.dtype, self.eps), "rms_norm",
                                   args=[x, self.weight], out=Tensor.placeholder(x.shape, x.dtype))
        return op.tensor_expr_op(_rms_norm, "rms_norm", [x, self.weight, self.eps])


def _rms_norm(x: te.Tensor, weight: te.Tensor, eps: float) -> te.Tensor:
    *lead, hidden = x.shape
    k = te.reduce_axis((0, hidden), name="k")
    squares = te.compute(lead, lambda *i: te.sum(te.power(x[(*i, k)].astype("float32"), 2),
                                                 axis=k), name="squares")

    def norm(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        scale = tirx.rsqrt(squares[i[:-1]] / tirx.const(int(hidden), "float32") + eps)
        return (x[i].astype("float32") * scale * weight[i[-1]].astype("float32")).astype(x.dtype)

    return te.compute(x.shape, norm, name="rms_norm")


class MistralAttention(nn.Module):
    """GQA self-attention with fused q/k/v projection; RoPE and the cache live in the KV cache.

    The decoder layer calls qkv_proj, attend and o_proj itself (o_proj fuses the residual add).
    """

    def __init__(self, config: MistralConfig, quantization: str | None = None) -> None:
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = MistralLinear(config.hidden_size, qkv_out, quantization)
        self.o_proj = MistralLinear(self.num_heads * self.head_dim, config.hidden_size,
                                    quantization)

    def attend(self, qkv: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        """Attention of the fused q/k/v projection through the cache: [b, s, heads * head_dim]."""
        b, s, _ = qkv.shape
        qkv = op.reshape(qkv, (b, s, self.num_heads + 2 * self.num_kv_heads, self.head_dim))
        out = cache.attention_with_fused_qkv(layer_id, qkv, self.num_heads,
                                             sm_scale=self.head_dim**-0.5)
        return op.reshape(out, (b, s, self.num_heads * self.head_dim))


class MistralMLP(nn.Module):
    """SiLU-gated MLP with fused gate/up projection (the layer calls act, then down_proj)."""

    def __init__(self, config: MistralConfig, quantization: str | None = None) -> None:
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = MistralLinear(config.hidden_size, 2 * config.intermediate_size,
                                          quantization)
        self.down_proj = MistralLinear(config.intermediate_size, config.hidden_size,
                                       quantization)

    def add_to(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + down(act(x))``, the add in the down GEMM's epilogue where it applies."""
        return self.down_proj.add_to(self.act(x), residual)

    def act(self, x: Tensor) -> Tensor:
        """silu(gate) * up, in the gate_up GEMM's epilogue where gemm_wgmma applies."""
        fused = self.gate_up_proj.gemm_epilogue(x, "silu")
        if fused is not None:
            return fused
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return op.silu(gate) * up


class MistralDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual connections."""

    def __init__(self, config: MistralConfig, quantization: str | None = None) -> None:
        eps = config.rms_norm_eps
        self.self_attn = MistralAttention(config, quantization)
        # the MLP is pluggable: dense, or Mixtral's experts (model/moe.py)
        self.mlp = MixtralSparseMoeBlock(
            config, MistralLinear(config.hidden_size, config.num_local_experts), quantization
        ) if config.is_moe else MistralMLP(config, quantization)
        self.input_layernorm = MistralRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = MistralRMSNorm(config.hidden_size, eps)

    def forward(self, hidden: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        if self._fused_decode(hidden):
            return self._decode(hidden, cache, layer_id)
        attn, mlp = self.self_attn, self.mlp
        out = attn.attend(attn.qkv_proj(self.input_layernorm(hidden)), cache, layer_id)
        hidden = attn.o_proj.add_to(out, hidden)
        return mlp.add_to(self.post_attention_layernorm(hidden), hidden)

    def _fused_decode(self, hidden: Tensor) -> bool:
        """Batch-1 decode on CUDA, where every projection is one of our GEMVs."""
        attn, mlp = self.self_attn, self.mlp
        if not isinstance(mlp, MistralMLP):
            return False
        static = [d if isinstance(d, int) else None for d in hidden.shape]
        return static == [1, 1, hidden.shape[-1]] and all(
            lin.takes_fused_decode(hidden.dtype)
            for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))

    def _decode(self, hidden: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        """The same layer with 4 GEMVs and no other kernel outside attention.

        RMSNorm is staged inside the qkv and gate_up GEMVs, silu(gate) * up is the gate_up
        GEMV's output (a warp reads a gate row and its up row), and the residual adds finish
        the o and down GEMVs.
        """
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv = attn.qkv_proj.fused(hidden, "norm", norm1.weight, norm1.eps)
        hidden = attn.o_proj.fused(attn.attend(qkv, cache, layer_id), "residual", hidden)
        act = mlp.gate_up_proj.fused(hidden, "norm_silu", norm2.weight, norm2.eps)
        return mlp.down_proj.fused(act, "residual", hidden)


class MistralModel(nn.Module):
    """Embedding, decoder stack and final norm."""

    def __init__(self, config: MistralConfig, quantization: str | None = None) -> None:
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MistralDecoderLayer(config, quantization)
                                     for _ in range(config.num_hidden_layers)])
        self.norm = MistralRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: Tensor, cache: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            hidden = layer(hidden, cache, layer_id)
        return self.norm(hidden)


class MistralForCausalLM(nn.Module):
    """The exported model (model/exports.py), which holds the model-owned KV cache.

    ``prefill`` and ``decode`` use that cache (model/kv_owned.py); ``*_paged`` use TVM's paged
    one (attention sinks); ``batch_step`` runs a batch on our paged cache (model/kv_paged.py).
    """

    def __init__(self, config: MistralConfig, dtype: str = "float32",
                 quantization: str | None = None) -> None:
        self.config = config
        self.dtype = dtype
        self.model = MistralModel(config, quantization)
        self.tie_word_embeddings = config.tie_word_embeddings
        self.embed_panel = 0  # CPU: the tied embedding's panel width (store_tied_embedding...)
        if not config.tie_word_embeddings:
            self.lm_head = MistralLinear(config.hidden_size, config.vocab_size, quantization)
        self.kv_state = KVState(config)

    def to(self, dtype: str | None = None) -> None:  # noqa: D102 (nn.Module API)
        super().to(dtype=dtype)
        if dtype is not None:
            self.dtype = dtype

    def store_tied_embedding_in_panels(self, panel: int) -> bool:
        """CPU: the tied embedding in panels, read by the LM head's GEMM and a gather.

        The LM head streams the whole table every token; in panels it runs at the GEMM's
        bandwidth, and looking one row up is a strided gather.
        """
        vocab, hidden = self.config.vocab_size, self.config.hidden_size
        if not self.tie_word_embeddings or not cpu_kernels.packable(vocab, hidden, panel):
            return False
        table = self.model.embed_tokens
        table.weight = nn.Parameter((vocab // panel, hidden, panel), dtype=table.weight.dtype)
        self.embed_panel = panel
        return True

    def get_logits(self, hidden: Tensor) -> Tensor:
        if self.tie_word_embeddings and self.embed_panel:
            vocab, width = self.config.vocab_size, self.config.hidden_size
            b, s, _ = hidden.shape
            gemm = cpu_kernels.gemm_packed(vocab, width, self.embed_panel,
                                           cpu_kernels.cpu_tile()[1], hidden.dtype,
                                           self.model.embed_tokens.weight.dtype, "float32")
            logits = op.tensor_ir_op(gemm, "lm_head_cpu",
                                     args=[op.reshape(hidden, (b * s, width)),
                                           self.model.embed_tokens.weight],
                                     out=Tensor.placeholder((b * s, vocab), "float32"))
            return op.reshape(logits, (b, s, vocab))
        if self.tie_word_embeddings:
            return project(hidden, self.model.embed_tokens.weight, "float32")
        return self.lm_head(hidden, out_dtype="float32")

    def embed(self, input_ids: Tensor) -> Tensor:
        if self.embed_panel:
            vocab, hidden = self.config.vocab_size, self.config.hidden_size
            table = self.model.embed_tokens.weight
            func = cpu_kernels.take_rows_packed(vocab, hidden, self.embed_panel, table.dtype)
            return op.tensor_ir_op(func, "embed_cpu", args=[input_ids, table],
                                   out=Tensor.placeholder((input_ids.shape[0], hidden),
                                                          table.dtype))
        return self.model.embed_tokens(input_ids)

    def prefill(self, input_embed: Tensor) -> Tensor:
        """Prompt rows after the owned cache's ``length``: the last row's logits."""
        cache = OwnedKVCache(self.kv_state, self.config)
        return self.get_logits(_take_last(self.model(input_embed, cache)))

    def decode(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """One token in (on the device): its logits [1, 1, vocab] and their argmax [1].

        The owned cache's ``length`` goes up by one, so greedy steps chain on the device.
        """
        embed = op.reshape(self.embed(input_ids), (1, 1, self.config.hidden_size))
        logits = self.get_logits(self.model(embed, OwnedKVCache(self.kv_state, self.config)))
        return logits, argmax_advance(logits, self.kv_state)

    def prefill_paged(self, input_embed: Tensor,
                      cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self.get_logits(_take_last(self.model(input_embed, cache))), cache

    def decode_paged(self, input_ids: Tensor, cache: PagedKVCache) -> tuple[Tensor, Tensor,
                                                                           PagedKVCache]:
        """``decode`` on TVM's paged cache (attention sinks)."""
        embed = op.reshape(self.embed(input_ids), (1, 1, self.config.hidden_size))
        logits = self.get_logits(self.model(embed, cache))
        return logits, _argmax(logits), cache

    def batch_step(self, input_ids: Tensor, positions: Tensor, rows: Tensor,
                   logit_index: Tensor, sinks: Tensor, tables: list[Tensor],
                   pools: list[Tensor]) -> Tensor:
        """One step of a batch: T tokens of several sequences (ragged), on the paged cache.

        Token t is at ``positions[t]`` of the sequence in row ``rows[t]`` of each group's page
        table (model/kv_paged.py); its key and value are written to the pools in place. ``sinks``
        [R, 3]: each row's attention sinks (count, page, shift), or [R, 1] zeros for an engine
        without sinks. The logits
        [R, vocab] are those of the tokens at ``logit_index`` (each sequence's last).
        """
        embed = self.embed(input_ids)
        hidden = op.reshape(embed, (1, input_ids.shape[0], self.config.hidden_size))
        cache = PagedCache(self.config, positions, rows, sinks, tables, pools)
        hidden = op.take(self.model(hidden, cache), logit_index, axis=1)
        logits = self.get_logits(hidden)
        return op.reshape(logits, (logit_index.shape[0], self.config.vocab_size))

    def sample(self, logits: Tensor, options: Tensor, rng: Tensor, adjust: Tensor,
               bias: Tensor) -> tuple[Tensor, Tensor]:
        """A token per row of ``batch_step``'s logits, and its logprob (model/sampler.py)."""
        return sampler.sample(logits, options, rng, adjust, bias)

    def top_logprobs(self, logits: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """The k most likely tokens per row and their logprobs (model/sampler.py)."""
        return sampler.top_logprobs(logits, k)

    def create_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                              prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                              support_sliding_window: tirx.Var) -> PagedKVCache:
        return paged_kv_cache(self.config, self.dtype, max_batch_size, max_total_seq_len,
                              prefill_chunk_size, page_size, support_sliding_window)

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        return module_spec(self)


def _take_last(hidden: Tensor) -> Tensor:
    """hidden[:, -1:, :] for a symbolic sequence length."""
    def last(x: te.Tensor) -> te.Tensor:
        b, s, h = x.shape
        return te.compute((b, 1, h), lambda i, _, k: x[i, s - 1, k], name="take_last")

    return op.tensor_expr_op(last, "take_last", [hidden])


def _argmax(logits: Tensor) -> Tensor:
    """The first index of each row's largest logit ([b, 1, vocab] float32 -> [b] int32)."""
    b, _, vocab = logits.shape
    if kernels.argmax_supported(vocab):
        return op.tensor_ir_op(kernels.argmax(vocab), "argmax", args=[logits],
                               out=Tensor.placeholder((b,), "int32"))
    flat = op.reshape(logits, (b, vocab))
    return op.wrap_nested(rx.op.astype(rx.op.argmax(flat._expr, axis=-1), "int32"), "argmax")
