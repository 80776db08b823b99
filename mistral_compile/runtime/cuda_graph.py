"""CUDA graphs of the batched decode step: captured once per (rows, table widths), then replayed.

A decode step of ``batch_step`` is about 1,700 VM instructions (allocations, shape arithmetic,
kernel launches); at batch 64 on the H200 the host needed 11.9 ms to issue them while the GPU
needed 9.8 ms to run them (scripts/gpu/step_profile.py), so the step waited on the host. The
runner therefore captures the step of each padded shape once into a CUDA graph and replays it.

How the capture stays valid:
- the step's inputs live in device buffers made once here; each step copies its arrays into
  views of them, whose addresses are the ones the graph recorded;
- a first eager call of the same shape, on the same stream, loads the kernels and fills TVM's
  pooled allocator and workspace pool, so the capture allocates and frees nothing of its own;
- TVM's kernel workspaces come from a per-thread pool that may free a block for a bigger one,
  so each capture runs on a thread of its own that then parks while its graph lives;
- the captured call's logits stay referenced here (the graph writes them on every replay); the
  intermediates it freed go back to TVM's pool, and whatever reuses them runs later on the same
  device order (the legacy default stream synchronises with this blocking stream), after the
  step's logits were consumed;
- the KV append is idempotent (the same key and value to the same slot), so the eager call and
  a replay of a step may both write it.
If a capture fails, the runner warns once and runs every later step eagerly.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import numpy as np
import tvm
import tvm_ffi

from mistral_compile.abi import SINK_COLUMNS
from mistral_compile.runtime.library import _check, _cudart

logger = logging.getLogger("mistral_compile.runtime")

_CAPTURE_RELAXED = 2  # cudaStreamCaptureModeRelaxed: the step may still allocate from pools


class GraphedStep:
    """``batch_step`` on fixed input buffers, replayed from a CUDA graph per shape."""

    def __init__(self, fn: Any, device: tvm.runtime.Device, max_rows: int,
                 max_widths: list[int]) -> None:
        self.fn, self.device = fn, device
        self.rt = _cudart()
        self._stream = ctypes.c_void_p()
        _check(self.rt, "cudaStreamCreateWithFlags", ctypes.byref(self._stream),
               ctypes.c_uint(0))  # 0: a blocking stream, ordered with the legacy default one
        self.max_rows, self.max_widths = max_rows, max_widths
        self._inputs = [tvm.runtime.empty((max_rows,), "int32", device) for _ in range(4)]
        self._sinks = tvm.runtime.empty((max_rows * SINK_COLUMNS,), "int32", device)
        self._tables = [tvm.runtime.empty((max_rows * w,), "int32", device) for w in max_widths]
        self.graphs: dict[tuple, tuple[ctypes.c_void_p, tvm.runtime.Tensor]] = {}
        self._threads: list[threading.Thread] = []  # one parked thread per graph (_capture)
        self._release = threading.Event()

    def fits(self, rows: int, widths: list[int]) -> bool:
        """Whether a step of ``rows`` rows and these table widths fits the buffers."""
        return rows <= self.max_rows and all(
            w <= m for w, m in zip(widths, self.max_widths, strict=True))

    def run(self, arrays: list[np.ndarray], tables: list[np.ndarray], pools: Any,
            params: Any) -> tvm.runtime.Tensor:
        """The step's logits [rows, vocab] (float32, on the device) from its graph."""
        rows = len(arrays[0])
        views = [buf._create_view((rows,)) for buf in self._inputs] + [
            self._sinks._create_view(arrays[4].shape)]
        table_views = [buf._create_view(t.shape) for buf, t in zip(self._tables, tables,
                                                                     strict=True)]
        for view, array in zip(views + table_views, list(arrays) + list(tables), strict=True):
            view.copyfrom(np.ascontiguousarray(array, dtype="int32"))
        key = (rows, *(t.shape[1] for t in tables))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(views, table_views, pools, params)
        _check(self.rt, "cudaGraphLaunch", entry[0], self._stream)
        return entry[1]

    def _capture(self, views: list, table_views: list, pools: Any, params: Any) -> tuple:
        """Capture on a thread of its own, which then parks for the graph's lifetime.

        TVM's kernel workspaces (split-K partials, TMA descriptors, attention partials) come
        from a per-thread pool that frees and reallocates a block when a later call needs a
        bigger one: a graph captured on the stepping thread would keep pointers into blocks
        that a later, larger eager step freed. The capture thread makes no other call, so the
        blocks its graph uses stay allocated until the graph is destroyed.
        """
        result: dict[str, Any] = {}
        done = threading.Event()

        def capture() -> None:
            try:
                result["graph"] = self._capture_here(views, table_views, pools, params)
            except BaseException as err:  # noqa: BLE001 - reported on the stepping thread
                result["error"] = err
            done.set()
            self._release.wait()  # keep this thread's workspace pool while the graph lives

        thread = threading.Thread(target=capture, name="cuda-graph-capture", daemon=True)
        thread.start()
        done.wait()
        if "error" in result:
            raise result["error"]
        self._threads.append(thread)
        return result["graph"]

    def _capture_here(self, views: list, table_views: list, pools: Any, params: Any) -> tuple:
        _check(self.rt, "cudaSetDevice", ctypes.c_int(self.device.index))
        args = (*views, tvm.runtime.convert(table_views), pools, params)
        graph, graph_exec = ctypes.c_void_p(), ctypes.c_void_p()
        with tvm_ffi.use_raw_stream(self.device, self._stream.value):
            self.fn(*args)  # eager: kernels loaded, this thread's pools filled for this shape
            _check(self.rt, "cudaStreamBeginCapture", self._stream,
                   ctypes.c_int(_CAPTURE_RELAXED))
            try:
                logits = self.fn(*args)
            finally:
                code = self.rt.cudaStreamEndCapture(self._stream, ctypes.byref(graph))
            if code != 0:
                raise RuntimeError(f"cudaStreamEndCapture failed with error {code}")
        _check(self.rt, "cudaGraphInstantiate", ctypes.byref(graph_exec), graph,
               ctypes.c_ulonglong(0))
        self.rt.cudaGraphDestroy(graph)
        logger.debug("captured the decode step of %s rows, widths %s", views[0].shape[0],
                     [v.shape[1] for v in table_views])
        return graph_exec, logits

    def __del__(self) -> None:
        rt = getattr(self, "rt", None)
        if rt is None:
            return
        for graph_exec, _ in getattr(self, "graphs", {}).values():
            rt.cudaGraphExecDestroy(graph_exec)
        if getattr(self, "_release", None) is not None:
            self._release.set()  # the capture threads end, and their workspace pools with them
        if getattr(self, "_stream", None) is not None and self._stream.value:
            rt.cudaStreamDestroy(self._stream)
