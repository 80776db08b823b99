"""Exact sliding-window masking for TVM 0.27's paged-KV attention kernels (see docs/attention.md).

TVM's paged prefill kernel masks cached keys with its window only when called with causal=1, but
the cache calls it with causal=0 whenever the chunk's own keys go through the ragged kernel, so
the window never applies to cached keys. The rule below is the Hugging Face one written in the
kernel's coordinates: chunk row ``row`` (absolute position L + row, L = cached length) sees cached
slot ``col`` (absolute L - (kv_len - col)) iff their distance (kv_len - col) + row < W.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import tvm
from tvm import tirx
from tvm.relax.frontend.nn.llm import _kernel_common, _prefill_kernels
from tvm.script import tirx as T

_PATCHED_MODULES = (_kernel_common, _prefill_kernels)
_NAME = "_causal_or_sliding_cross_mask"
TESTED_TVM = "0.27.0.post1"


def exact_window_mask(causal, row, col, kv_len, qo_len, sliding_window_size):  # noqa: ANN001, ANN201
    """Visible iff slot ``col`` lies within ``sliding_window_size`` of chunk row ``row``."""
    nearest = T.max(kv_len - T.max(sliding_window_size - row - 1, 0), 0)
    return T.if_then_else(
        sliding_window_size > 0,
        tirx.And(col < kv_len, col >= nearest),
        _kernel_common._causal_mask(causal, row, col, kv_len, qo_len),
    )


@contextlib.contextmanager
def exact_window_kernels() -> Iterator[None]:
    """Generate TVM's attention kernels with the exact window mask while the block runs."""
    if tvm.__version__ != TESTED_TVM:
        raise RuntimeError(f"the window-mask override is verified for TVM {TESTED_TVM}, "
                           f"found {tvm.__version__}: re-run the fidelity tests and update it")
    saved = []
    for module in _PATCHED_MODULES:
        if not hasattr(module, _NAME):
            raise RuntimeError(f"{module.__name__}.{_NAME} is gone: TVM's kernels changed")
        saved.append(getattr(module, _NAME))
        setattr(module, _NAME, exact_window_mask)
    try:
        yield
    finally:
        for module, original in zip(_PATCHED_MODULES, saved, strict=True):
            setattr(module, _NAME, original)
