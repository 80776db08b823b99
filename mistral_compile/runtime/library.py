"""Loading a compiled library with TVM's runtime alone (no compiler), on CPU or CUDA devices."""

from __future__ import annotations

import ctypes
import functools
import glob
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from mistral_compile.errors import MistralCompileError

METADATA_FUNC = "_metadata"
LIBRARY_FORMAT_VERSION = 9  # 2: "target" is cpu/cuda, "arch" added; 3: "param_shapes";
# 5: decode takes the token id and also returns its argmax; 6: prefill/decode on the model-owned
# KV cache (its storage among the parameters), *_paged on TVM's; 7: CPU libraries: "cpu_level",
# "cpu_flags", and "param_layouts" (weights the engine packs in panels at load); 8: batch_step
# on our paged cache (model/kv_paged.py) replaces batch_*, "page_size"; 9: batch_step takes each
# row's attention sinks (count, page, shift), or one zero column without sinks
STATE_PREFIX = "kv_state."  # parameters that hold the owned KV cache: allocated, never loaded
_loaded: set[str] = set()


def _load(path: str) -> None:
    if path not in _loaded:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        _loaded.add(path)


def load_cudart(toolkit_homes: Sequence[str] = ()) -> None:
    """Load libcudart.so.13 from the loader's path, a CUDA toolkit, or the CUDA runtime wheel."""
    try:
        _load("libcudart.so.13")
        return
    except OSError:
        pass
    candidates = [os.path.join(home, sub, "libcudart.so.13") for home in toolkit_homes if home
                  for sub in ("lib64", "lib", "targets/x86_64-linux/lib")]
    for base in sys.path:
        candidates += glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcudart.so.13"))
    for path in candidates:
        if os.path.isfile(path):
            _load(path)
            return
    raise MistralCompileError("libcudart.so.13 not found (TVM 0.27's CUDA runtime is built "
                              "against CUDA 13): set CUDA_HOME to a CUDA 13 toolkit, or pip "
                              "install nvidia-cuda-runtime")


def prepare_runtime(kind: str, toolkit_homes: Sequence[str] = ()) -> None:
    """Make TVM able to run ``kind`` ("cpu"/"cuda") libraries, also when only its runtime is here.

    A runtime-only TVM (no libtvm_compiler.so) does not autoload its sidecar libraries: the
    CUDA device API and module loader (libtvm_runtime_cuda.so) and the VM extras
    (libtvm_runtime_extra.so, which holds the paged KV cache). We load them explicitly.
    """
    libdir = Path(tvm.__file__).parent / "lib"
    if kind == "cuda" and not tvm.get_global_func("device_api.cuda", allow_missing=True):
        load_cudart(toolkit_homes)
        try:
            _load(str(libdir / "libtvm_runtime_cuda.so"))
        except OSError as err:
            raise MistralCompileError(f"TVM's CUDA runtime cannot load here: {err}") from None
    if (not tvm.get_global_func("vm.builtin.paged_attention_kv_cache_create", allow_missing=True)
            and (libdir / "libtvm_runtime_extra.so").is_file()):
        _load(str(libdir / "libtvm_runtime_extra.so"))


def parse_device(device: str) -> tuple[str, int]:
    """'cpu', 'cuda' or 'cuda:N' -> (kind, index)."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise MistralCompileError(f"device {device!r}: expected cpu, cuda or cuda:N")
    return kind, int(index or 0)


def tvm_device(kind: str, index: int) -> tvm.runtime.Device:
    """The TVM device, checked to exist (CPU: TVM's thread pool gets every core we may use)."""
    if kind == "cpu":
        # TVM assumes two hyper-threads per core on x86 and starts half as many threads
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
        return tvm.cpu(index)
    prepare_runtime("cuda")
    dev = tvm.cuda(index)
    if not dev.exist:
        raise MistralCompileError(f"device cuda:{index} not found (no NVIDIA GPU or driver)")
    return dev


def check_cpu(lib: Path, meta: dict[str, Any]) -> None:
    """Refuse a CPU library built for features this CPU lacks (one line, before any kernel)."""
    from mistral_compile.compiler.devices import host_cpu_flags

    missing = sorted(set(meta.get("cpu_flags") or ()) - host_cpu_flags())
    if missing:
        raise MistralCompileError(f"{lib}: built for {meta.get('cpu_level')}, and this CPU "
                                  f"lacks {', '.join(missing)}: compile it here (--cpu native) "
                                  "or for a lower level (--cpu x86-64-v3 or x86-64)")


def load_vm(lib: Path, device: tvm.runtime.Device, kind: str) -> Any:
    """A VirtualMachine over ``lib`` on ``device``, with the runtime pieces it needs loaded."""
    from tvm.runtime.vm import VirtualMachine

    prepare_runtime(kind)
    try:
        stat = Path(lib).stat()
        module = _load_module(str(Path(lib).resolve()), stat.st_mtime_ns, stat.st_size)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types
        raise MistralCompileError(f"{lib}: cannot load ({str(err).strip().splitlines()[-1]})") \
            from None
    return VirtualMachine(module, device)


@functools.lru_cache(maxsize=16)
def _load_module(path: str, _mtime_ns: int, _size: int) -> Any:
    """A library file's module, loaded once per version of the file in a process.

    A driver reads a library's shard count (runtime/parallel.py library_shards) before its
    Artifact loads it, and bench reads its parameter shapes first too: one load serves all.
    """
    return tvm.runtime.load_module(path)


def read_metadata(vm: Any) -> dict[str, Any]:
    """The metadata a library was compiled with (config fingerprint, dtype, target, params)."""
    return json.loads(vm[METADATA_FUNC]().numpy().tobytes().decode())


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime already in the process (TVM's, or torch's if torch came first)."""
    try:
        return ctypes.CDLL("libcudart.so.13", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        load_cudart()
        return ctypes.CDLL("libcudart.so.13")


def _check(rt: ctypes.CDLL, name: str, *args: Any) -> None:
    code = getattr(rt, name)(*args)
    if code != 0:
        raise MistralCompileError(f"CUDA {name} failed with error {code}")


def zeros(shape: Sequence[int], dtype: str, device: tvm.runtime.Device) -> tvm.runtime.Tensor:
    """A zero-filled tensor on ``device``.

    On CUDA no host copy is made (the KV cache of a long context is gigabytes): the memory is
    cleared by cudaMemsetAsync on TVM's stream.
    """
    if device.dlpack_device_type() != 2:  # 2: kDLCUDA
        return tvm.runtime.tensor(np.zeros(shape, dtype), device)
    out = tvm.runtime.empty(shape, dtype, device)
    nbytes = int(np.prod(shape)) * tvm.runtime.DataType(dtype).bits // 8
    rt = _cudart()
    _check(rt, "cudaSetDevice", ctypes.c_int(device.index))
    _check(rt, "cudaMemsetAsync", ctypes.c_void_p(out.data_ptr()), ctypes.c_int(0),
           ctypes.c_size_t(nbytes), ctypes.c_void_p(0))
    return out


_ALIGN = 256


def to_device(array: np.ndarray, device: tvm.runtime.Device) -> tvm.runtime.Tensor:
    """``array`` copied into a new tensor on ``device``."""
    out = tvm.runtime.empty(array.shape, str(array.dtype), device)
    out.copyfrom(np.ascontiguousarray(array))
    return out


class WeightArena:
    """The weights of one engine, on the CPU in one mapping of 2 MiB pages.

    Decode streams every weight once per token: with 4 KiB pages that is a TLB miss every
    4 KiB. One anonymous mapping, madvise'd before it is written, puts the small tensors in
    huge pages too; TVM reads the tensors in place (DLPack, no copy). On other devices ``put``
    is a plain copy to the device.
    """

    def __init__(self, specs: list[tuple[list[int], str]], device: tvm.runtime.Device) -> None:
        self.device, self.offset, self.memory = device, 0, None
        if device.dlpack_device_type() != 1:  # 1: kDLCPU
            return
        import mmap

        total = sum(-(-int(np.prod(shape)) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
                    for shape, dtype in specs)
        self.memory = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.memory.madvise(mmap.MADV_HUGEPAGE)
        self.bytes = np.frombuffer(self.memory, dtype=np.uint8)

    def put(self, array: np.ndarray) -> tvm.runtime.Tensor:
        """``array`` copied into the arena (or onto the device)."""
        if self.memory is None:
            return to_device(array, self.device)
        size = array.nbytes
        view = self.bytes[self.offset:self.offset + size].view(array.dtype).reshape(array.shape)
        view[...] = array
        self.offset += -(-size // _ALIGN) * _ALIGN
        return tvm.runtime.from_dlpack(view)


class HostUploads:
    """Small host arrays into device tensors without blocking the host (CUDA, stream 0).

    TVM's ``copyfrom`` synchronises the stream after its copy: a sampled step's inputs,
    uploaded while the previous decode step still ran, made the host wait for that step, and
    the GPU then waited for the host to queue the draw and the next step. Here each batch of
    uploads (``begin`` .. ``end``) is staged in one of two pinned host slots and queued with
    cudaMemcpyAsync on the stream TVM launches on; a slot is rewritten only once the event
    recorded behind its last copies has passed.
    """

    def __init__(self, device_index: int, slots: int = 2) -> None:
        self._rt = _cudart()
        _check(self._rt, "cudaSetDevice", ctypes.c_int(device_index))
        self._hosts: list[ctypes.c_void_p | None] = [None] * slots
        self._sizes = [0] * slots
        self._events = []
        for _ in range(slots):
            event = ctypes.c_void_p()
            _check(self._rt, "cudaEventCreateWithFlags", ctypes.byref(event), ctypes.c_uint(2))
            self._events.append(event)  # 2: cudaEventDisableTiming
        self._slot, self._offset, self._recorded = 0, 0, [False] * slots

    def begin(self) -> None:
        """Start a batch in the next slot (waiting for its previous copies, if still queued)."""
        self._slot = (self._slot + 1) % len(self._hosts)
        if self._recorded[self._slot]:
            _check(self._rt, "cudaEventSynchronize", self._events[self._slot])
            self._recorded[self._slot] = False
        self._offset = 0

    def put(self, array: np.ndarray, target: tvm.runtime.Tensor) -> None:
        """Queue the copy of ``array`` (C-contiguous, ``target``'s size) into ``target``."""
        nbytes = array.nbytes
        start = self._offset
        self._offset += -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        host = self._reserve(self._offset)
        if nbytes:
            ctypes.memmove(host.value + start, array.ctypes.data, nbytes)
            _check(self._rt, "cudaMemcpyAsync", ctypes.c_void_p(target.data_ptr()),
                   ctypes.c_void_p(host.value + start), ctypes.c_size_t(nbytes),
                   ctypes.c_int(1), ctypes.c_void_p(0))  # 1: host to device; stream 0

    def end(self) -> None:
        """Mark the batch's copies, so that the slot is not rewritten before they ran."""
        _check(self._rt, "cudaEventRecord", self._events[self._slot], ctypes.c_void_p(0))
        self._recorded[self._slot] = True

    def _reserve(self, nbytes: int) -> ctypes.c_void_p:
        """The current slot's pinned memory, grown (keeping what it holds) to ``nbytes``."""
        slot, host = self._slot, self._hosts[self._slot]
        if host is not None and self._sizes[slot] >= nbytes:
            return host
        size = max(1 << 16, 1 << (nbytes - 1).bit_length())
        grown = ctypes.c_void_p()
        _check(self._rt, "cudaHostAlloc", ctypes.byref(grown), ctypes.c_size_t(size),
               ctypes.c_uint(0))
        if host is not None:  # this batch's earlier arrays are queued from the old memory
            _check(self._rt, "cudaStreamSynchronize", ctypes.c_void_p(0))
            ctypes.memmove(grown.value, host.value, self._sizes[slot])
            self._rt.cudaFreeHost(host)
        self._hosts[slot], self._sizes[slot] = grown, size
        return grown

    def __del__(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        if any(getattr(self, "_recorded", [])):
            rt.cudaStreamSynchronize(ctypes.c_void_p(0))
        for event in getattr(self, "_events", []):
            rt.cudaEventDestroy(event)
        for host in getattr(self, "_hosts", []):
            if host is not None and host.value:
                rt.cudaFreeHost(host)


class TokenReader:
    """Reads int32 scalars from the GPU into pinned host memory without blocking the host.

    ``start`` queues the 4-byte copy and an event on the default stream (the one TVM launches
    on); ``result`` waits for that event only. So the host can queue the next decode step while
    this one still runs, and read this step's token when it is done.
    """

    def __init__(self, device_index: int, slots: int = 2) -> None:
        self._rt = _cudart()
        self._call("cudaSetDevice", ctypes.c_int(device_index))
        self._host = ctypes.c_void_p()
        self._call("cudaHostAlloc", ctypes.byref(self._host), ctypes.c_size_t(4 * slots),
                   ctypes.c_uint(0))
        self._events = []
        for _ in range(slots):
            event = ctypes.c_void_p()
            self._call("cudaEventCreateWithFlags", ctypes.byref(event), ctypes.c_uint(2))
            self._events.append(event)  # 2: cudaEventDisableTiming
        self._values = (ctypes.c_int32 * slots).from_address(self._host.value)

    def _call(self, name: str, *args: Any) -> None:
        _check(self._rt, name, *args)

    def start(self, slot: int, tensor: tvm.runtime.Tensor) -> None:
        """Queue the copy of ``tensor[0]`` (int32, on the GPU) into ``slot``."""
        self._call("cudaMemcpyAsync", ctypes.c_void_p(self._host.value + 4 * slot),
                   ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(4), ctypes.c_int(2),
                   ctypes.c_void_p(0))  # 2: device to host; stream 0, TVM's
        self._call("cudaEventRecord", self._events[slot], ctypes.c_void_p(0))

    def result(self, slot: int) -> int:
        """The value ``start`` copied into ``slot``, once the copy is done."""
        self._call("cudaEventSynchronize", self._events[slot])
        return int(self._values[slot])

    def __del__(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        for event in getattr(self, "_events", []):
            rt.cudaEventDestroy(event)
        if getattr(self, "_host", None) is not None and self._host.value:
            rt.cudaFreeHost(self._host)

