"""q4f16_1 weight quantization: 4-bit symmetric, groups of 32 along the input, float16 scales.

A weight W[n, k] becomes ``q_weight`` uint32[n, k / 8] and ``q_scale`` float16[n, k / 32]:
scale = max|W[group]| / 7 (rounded to float16), q = clip(round(W / scale), -7, 7) + 7, and
W is recovered as (q - 7) * scale. Each uint32 holds 8 consecutive elements 2i, 2i+1 (i < 4) at
bits 4i and 16 + 4i, so a shift and a mask give a half2 pair of neighbours (the GEMV kernel's
layout; see compiler/csrc/mc_kernels.cuh).
"""

from __future__ import annotations

import numpy as np

GROUP = 32
MAX_INT = 7
PER_WORD = 8
# bit offset of element j (0..7) of a word
SHIFTS = np.array([4 * (j // 2) + 16 * (j % 2) for j in range(PER_WORD)], dtype=np.uint32)


def quantizable(shape: tuple[int, ...]) -> bool:
    """Whether a [n, k] weight can be quantized (k a multiple of the group size)."""
    return len(shape) == 2 and shape[1] % GROUP == 0


def quantized_shapes(n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (q_weight, q_scale) for a [n, k] weight."""
    return (n, k // PER_WORD), (n, k // GROUP)


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W[n, k] (any float dtype) -> (q_weight uint32[n, k/8], q_scale float16[n, k/32])."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"input dimension {k} is not a multiple of the group size {GROUP}")
    groups = w.astype(np.float32).reshape(n, k // GROUP, GROUP)
    scale = (np.abs(groups).max(axis=-1) / MAX_INT).astype(np.float16)
    safe = np.where(scale == 0, np.float16(1), scale).astype(np.float32)[..., None]
    q = np.clip(np.rint(groups / safe), -MAX_INT, MAX_INT).astype(np.int32) + MAX_INT
    words = q.reshape(n, k // PER_WORD, PER_WORD).astype(np.uint32) << SHIFTS
    return np.bitwise_or.reduce(words, axis=-1), scale


def dequantize(q_weight: np.ndarray, q_scale: np.ndarray) -> np.ndarray:
    """(q_weight, q_scale) -> W[n, k] in float32."""
    n, words = q_weight.shape
    q = (q_weight[..., None] >> SHIFTS) & 0xF
    q = q.reshape(n, words * PER_WORD).astype(np.float32) - MAX_INT
    return q * np.repeat(q_scale.astype(np.float32), GROUP, axis=1)
