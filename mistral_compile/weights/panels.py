"""The panel layout of CPU libraries' projection weights (numpy only: the engine packs at load).

``Wp[N / P, K, P]`` with ``Wp[o, k, p] = W[o * P + p, k]``: one k step of a panel is P
consecutive values. q4f16_1 words [N, K/8] and scales [N, K/32] are packed the same way.
"""

from __future__ import annotations

import numpy as np


def packable(n: int, k: int, panel: int) -> bool:
    """Whether a [n, k] weight can be stored in panels of ``panel`` rows."""
    return n % panel == 0 and k > 0


def pack_rows(w: np.ndarray, panel: int) -> np.ndarray:
    """W[n, k] -> Wp[n / P, k, P] (any dtype)."""
    n, k = w.shape
    return np.ascontiguousarray(w.reshape(n // panel, panel, k).transpose(0, 2, 1))
