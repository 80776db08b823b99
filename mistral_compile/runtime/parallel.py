"""A tensor-parallel shard's process: the all-reduce its library calls, and its weights.

One process runs each shard (as vLLM's workers do), every one the same steps in lockstep; the
library of a sharded config calls ``ALLREDUCE`` after o_proj and down_proj
(model/parallel.py), which this module binds to a collective of the caller's choosing:
``torch.distributed`` through ``torch_all_reduce`` (gloo on CPUs and where GPUs are shared,
NCCL where each shard has a GPU of its own). On a GPU the partial sums stay on the device:
the tensors pass to torch by DLPack, no copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm

from mistral_compile.abi import ALLREDUCE
from mistral_compile.config import MistralConfig
from mistral_compile.errors import MistralCompileError
from mistral_compile.io import read_json_object
from mistral_compile.weights.convert import MANIFEST_NAME
from mistral_compile.weights.safetensors_io import SafetensorsFile
from mistral_compile.weights.shard import shard_params

_bound = False  # whether this process bound ALLREDUCE to a collective


AllReduce = Callable[[tvm.runtime.Tensor, tvm.runtime.Tensor], None]


def register_all_reduce(all_reduce: AllReduce) -> None:
    """Bind this process's ``ALLREDUCE`` to ``all_reduce(x, out)``.

    ``out`` becomes the sum over the shards of ``x`` (each shard's partial sums); both tensors
    are on the library's device.
    """
    global _bound
    tvm.register_global_func(ALLREDUCE, all_reduce, override=True)
    _bound = True


def unbind_all_reduce() -> None:
    """Undo ``register_all_reduce`` (its collective is gone)."""
    global _bound
    _bound = False
    tvm.register_global_func(ALLREDUCE, _unbound, override=True)


def _unbound(x: tvm.runtime.Tensor, out: tvm.runtime.Tensor) -> None:
    raise MistralCompileError("tensor-parallel all-reduce called with no collective bound "
                              "(runtime/parallel.py register_all_reduce)")


def all_reduce_bound() -> bool:
    """Whether this process's ``ALLREDUCE`` is bound (``register_all_reduce``)."""
    return _bound


def declare_all_reduce() -> None:
    """Give ``ALLREDUCE`` a name before any library loads (the VM resolves it at load).

    Unbound, it refuses to run; a sharded library is refused before that (Artifact).
    """
    if tvm.get_global_func(ALLREDUCE, allow_missing=True) is None:
        tvm.register_global_func(ALLREDUCE, _unbound)


def torch_all_reduce(group: object | None = None) -> AllReduce:
    """The sum over the processes of ``torch.distributed``'s (initialised) group.

    CUDA tensors are reduced in place on the device (torch's current stream is the legacy
    default stream TVM launches on, so the reduction follows the kernels that made x); CPU
    tensors go through numpy.
    """
    import torch
    import torch.distributed as dist

    def all_reduce(x: tvm.runtime.Tensor, out: tvm.runtime.Tensor) -> None:
        if x.device.dlpack_device_type() == 2:  # kDLCUDA
            total = torch.from_dlpack(out)
            total.copy_(torch.from_dlpack(x))
            dist.all_reduce(total, group=group)
            return
        total = torch.from_numpy(np.array(x.numpy(), copy=True))
        dist.all_reduce(total, group=group)
        out.copyfrom(np.ascontiguousarray(total.numpy(), dtype=x.dtype))

    return all_reduce


def library_shards(lib: str | Path, device: str) -> int:
    """How many tensor-parallel shards ``lib`` was compiled for (its metadata)."""
    from mistral_compile.runtime.library import (
        load_vm,
        parse_device,
        read_metadata,
        tvm_device,
    )

    kind, index = parse_device(device)
    declare_all_reduce()  # a sharded library names it; the VM resolves names at load
    return int(read_metadata(load_vm(Path(lib), tvm_device(kind, index), kind))
               .get("tensor_parallel_shards") or 1)


def shard_device(device: str, rank: int, shards: int, gpus: int) -> str:
    """Shard ``rank``'s device: ``cuda:I`` gives shard r ``cuda:(I + r) % gpus``; CPUs stay.

    With fewer GPUs than shards, shards share GPUs (a check of the sharded path on one GPU;
    the collective is then gloo, as NCCL refuses two ranks on one GPU).
    """
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return device
    return f"cuda:{(int(index or 0) + rank) % max(gpus, 1)}"


def collective_backend(device: str, shards: int, gpus: int) -> str:
    """NCCL when every shard has a GPU of its own, else gloo."""
    return "nccl" if device.startswith("cuda") and gpus >= shards else "gloo"


def shard_weights(weights_dir: str | Path, config: MistralConfig,
                  rank: int) -> dict[str, np.ndarray]:
    """Shard ``rank``'s weights, cut from the whole model's converted weights (its folder).

    The files are memory-mapped (SafetensorsFile, as a whole model's load reads them): only
    the shard's part of a cut weight is copied, not every file read whole into each process.
    """
    weights_dir = Path(weights_dir)
    manifest = read_json_object(weights_dir / MANIFEST_NAME)
    if manifest.get("config_fingerprint") != config.fingerprint():
        raise MistralCompileError(f"{weights_dir / MANIFEST_NAME}: weights were converted for "
                                  "a different config than mistral-config.json")
    files: dict[str, SafetensorsFile] = {}
    full: dict[str, np.ndarray] = {}
    for entry in manifest["params"]:
        name = entry["file"]
        if name not in files:
            files[name] = SafetensorsFile(weights_dir / name)
        full[entry["name"]] = files[name].get(entry["name"])
    return shard_params(full, config, rank)
