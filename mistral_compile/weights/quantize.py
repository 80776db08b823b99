"""4-bit weight formats: groups of 32 along the input, float16 scales.

q4f16_1 (symmetric): a weight W[n, k] becomes ``q_weight`` uint32[n, k / 8] and ``q_scale``
float16[n, k / 32]: scale = max|W[group]| / 7 (rounded to float16), q = clip(round(W / scale),
-7, 7) + 7, and W is recovered as (q - 7) * scale.

q4f16_2 (with a minimum, 16 levels, the form of GGUF's Q4_1 and AWQ): also ``q_min``
float16[n, k / 32]; W = q * scale + min with q in 0..15 (min-max per group: min = the group's
least value, scale = (max - min) / 15). GGUF Q4_0 / Q4_1 blocks are this form already and are
imported as they are (``codes_from_gguf``): no second rounding.

Each uint32 holds 8 consecutive codes 2i, 2i+1 (i < 4) at bits 4i and 16 + 4i, so a shift and a
mask give a half2 pair of neighbours (the GEMV kernel's layout; see compiler/csrc/mc_kernels.cuh).
"""

from __future__ import annotations

import numpy as np

GROUP = 32
MAX_INT = 7
PER_WORD = 8
# bit offset of element j (0..7) of a word
SHIFTS = np.array([4 * (j // 2) + 16 * (j % 2) for j in range(PER_WORD)], dtype=np.uint32)
Q4_FORMATS = {"q4f16_1": ("q_weight", "q_scale"), "q4f16_2": ("q_weight", "q_scale", "q_min")}


def quantizable(shape: tuple[int, ...]) -> bool:
    """Whether a [n, k] (or stacked [E, n, k]) weight can be quantized: k % GROUP == 0."""
    return len(shape) in (2, 3) and shape[-1] % GROUP == 0


def quantized_shapes(n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (q_weight, q_scale) (and q_min: q_scale's) for a [n, k] weight."""
    return (n, k // PER_WORD), (n, k // GROUP)


def pack_codes(q: np.ndarray) -> np.ndarray:
    """Codes 0..15 [n, k] -> uint32 words [n, k / 8] in the kernels' nibble order."""
    n, k = q.shape
    words = q.reshape(n, k // PER_WORD, PER_WORD).astype(np.uint32) << SHIFTS
    return np.bitwise_or.reduce(words, axis=-1)


def unpack_codes(q_weight: np.ndarray) -> np.ndarray:
    """uint32 words [n, k / 8] -> codes 0..15 [n, k] (uint8)."""
    n, words = q_weight.shape
    return ((q_weight[..., None] >> SHIFTS) & 0xF).reshape(n, words * PER_WORD).astype(np.uint8)


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q4f16_1: W[n, k] (any float dtype) -> (q_weight uint32[n, k/8], q_scale float16[n, k/32])."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"input dimension {k} is not a multiple of the group size {GROUP}")
    groups = w.astype(np.float32).reshape(n, k // GROUP, GROUP)
    scale = (np.abs(groups).max(axis=-1) / MAX_INT).astype(np.float16)
    safe = np.where(scale == 0, np.float16(1), scale).astype(np.float32)[..., None]
    q = np.clip(np.rint(groups / safe), -MAX_INT, MAX_INT).astype(np.int32) + MAX_INT
    return pack_codes(q.reshape(n, k)), scale


def dequantize(q_weight: np.ndarray, q_scale: np.ndarray,
               q_min: np.ndarray | None = None) -> np.ndarray:
    """(q_weight, q_scale) -> W[n, k] in float32; with ``q_min``, q4f16_2's q * scale + min."""
    q = unpack_codes(q_weight).astype(np.float32)
    scale = np.repeat(q_scale.astype(np.float32), GROUP, axis=1)
    if q_min is None:
        return (q - MAX_INT) * scale
    return q * scale + np.repeat(q_min.astype(np.float32), GROUP, axis=1)


def quantize_min(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q4f16_2: W[n, k] -> (q_weight uint32[n, k/8], q_scale, q_min float16[n, k/32])."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"input dimension {k} is not a multiple of the group size {GROUP}")
    groups = w.astype(np.float32).reshape(n, k // GROUP, GROUP)
    lo, hi = groups.min(axis=-1), groups.max(axis=-1)
    q_min = lo.astype(np.float16)
    scale = ((hi - q_min.astype(np.float32)) / 15).astype(np.float16)
    safe = np.where(scale == 0, np.float16(1), scale).astype(np.float32)[..., None]
    q = np.clip(np.rint((groups - q_min.astype(np.float32)[..., None]) / safe), 0, 15)
    return pack_codes(q.reshape(n, k).astype(np.int32)), scale, q_min


def quantize_as(quantization: str, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """The arrays of Q4_FORMATS[quantization] for a float weight [n, k] or stacked [E, n, k].

    Stacked (Mixtral's experts): each expert's rows are quantized as its own weight's would be.
    """
    if w.ndim == 3:
        e, n, k = w.shape
        flat = quantize_as(quantization, w.reshape(e * n, k))
        return tuple(a.reshape(e, n, a.shape[-1]) for a in flat)
    return quantize(w) if quantization == "q4f16_1" else quantize_min(w)
