"""4-bit weights dequantized in the graph (TE), for the targets without our q4 kernels."""

from __future__ import annotations

from tvm import te, tirx

from mistral_compile.weights.quantize import GROUP, MAX_INT, PER_WORD


def dequantize(q_weight: te.Tensor, q_scale: te.Tensor,
               q_min: te.Tensor | None = None) -> te.Tensor:
    """q4f16_1 (q - 7) * scale, or q4f16_2 q * scale + min, rounded once to float16.

    Any leading dimensions ([n, k / 8] for a projection, [E, n, k / 8] for stacked experts):
    the packed words and groups run along the last one.
    """
    *lead, words = q_weight.shape

    def element(*index: tirx.PrimExpr) -> tirx.PrimExpr:
        *at, j = index
        shift = (j % PER_WORD // 2 * 4 + j % 2 * 16).astype("uint32")
        q = ((q_weight[(*at, j // PER_WORD)] >> shift) & tirx.const(0xF, "uint32")).astype(
            "float32")
        scale = q_scale[(*at, j // GROUP)].astype("float32")
        if q_min is not None:  # q4f16_2
            return (q * scale + q_min[(*at, j // GROUP)].astype("float32")).astype("float16")
        return ((q - MAX_INT) * scale).astype("float16")

    return te.compute((*lead, words * PER_WORD), element, name="dequantize")
