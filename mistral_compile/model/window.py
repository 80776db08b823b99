"""Exact sliding-window (and sink) masking for TVM 0.27's paged-KV attention kernels.

See docs/attention.md. TVM's paged prefill kernel masks cached keys with its window only when
called with causal=1, but the cache calls it with causal=0 whenever the chunk's own keys go
through the ragged kernel, so the window never applies to cached keys. The rule below is the
Hugging Face one written in the kernel's coordinates, extended with StreamingLLM sinks: with
``sink`` sink slots in the cache (the sequence's ``length_info[2]``) and window W, chunk row
``row`` sees cached slot ``col`` (of ``kv_len``) iff ``col < sink`` or
``(kv_len - col) + row < W - sink``. The mask function gets no sequence index, so the paged
kernels' call of ``_get_kv_chunk_len(..., seq_id, length_info, ...)``, made just before the mask
in every kernel that windows, records which buffer and sequence the mask reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import tvm
from tvm import tirx
from tvm.relax.frontend.nn.llm import _kernel_common, _prefill_kernels
from tvm.script import tirx as T

TESTED_TVM = "0.27.0.post1"
_original_chunk_len = _kernel_common._get_kv_chunk_len
_current: dict[str, object] = {}  # the paged kernel being generated: its length_info, seq id


def _recording_chunk_len(num_pages, page_size, seq_id, length_info, sliding_window):  # noqa: ANN001, ANN202
    _current.update(length_info=length_info if sliding_window else None, seq_id=seq_id)
    return _original_chunk_len(num_pages, page_size, seq_id, length_info, sliding_window)


def exact_window_mask(causal, row, col, kv_len, qo_len, sliding_window_size):  # noqa: ANN001, ANN201
    """Visible iff slot ``col`` is a sink or lies within the window of chunk row ``row``."""
    window = sliding_window_size.value if isinstance(sliding_window_size, tirx.IntImm) \
        else sliding_window_size
    if isinstance(window, int) and window == 0:
        return _kernel_common._causal_mask(causal, row, col, kv_len, qo_len)
    length_info = _current.get("length_info")
    if length_info is None:
        raise RuntimeError("window mask used outside a paged sliding-window kernel: "
                           "TVM's kernels changed, re-verify mistral_compile/model/window.py")
    sink = length_info[2, _current["seq_id"]]
    nearest = T.max(kv_len - T.max(sliding_window_size - sink - row - 1, 0), 0)
    return tirx.And(col < kv_len, tirx.Or(col < sink, col >= nearest))


_PATCHES = (
    (_kernel_common, "_causal_or_sliding_cross_mask", exact_window_mask),
    (_prefill_kernels, "_causal_or_sliding_cross_mask", exact_window_mask),
    (_prefill_kernels, "_get_kv_chunk_len", _recording_chunk_len),
)


@contextlib.contextmanager
def exact_window_kernels() -> Iterator[None]:
    """Generate TVM's attention kernels with the exact window/sink mask while the block runs."""
    if tvm.__version__ != TESTED_TVM:
        raise RuntimeError(f"the window-mask override is verified for TVM {TESTED_TVM}, "
                           f"found {tvm.__version__}: re-run the fidelity tests and update it")
    saved = []
    for module, name, replacement in _PATCHES:
        if not hasattr(module, name):
            raise RuntimeError(f"{module.__name__}.{name} is gone: TVM's kernels changed")
        saved.append(getattr(module, name))
        setattr(module, name, replacement)
    try:
        yield
    finally:
        _current.clear()
        for (module, name, _), original in zip(_PATCHES, saved, strict=True):
            setattr(module, name, original)
