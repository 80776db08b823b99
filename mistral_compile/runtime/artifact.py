"""Artifact loading: a compiled library and its weights, checked against each other, on a device."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from mistral_compile.config import MistralConfig, read_config
from mistral_compile.errors import MistralCompileError
from mistral_compile.io import read_json_object
from mistral_compile.runtime.library import (
    LIBRARY_FORMAT_VERSION,
    STATE_PREFIX,
    WeightArena,
    check_cpu,
    load_vm,
    parse_device,
    read_metadata,
    to_device,
    tvm_device,
    zeros,
)
from mistral_compile.runtime.parallel import all_reduce_bound, declare_all_reduce
from mistral_compile.weights.convert import MANIFEST_NAME
from mistral_compile.weights.panels import pack_rows
from mistral_compile.weights.safetensors_io import SafetensorsFile
from mistral_compile.weights.verify import verify_files

logger = logging.getLogger("mistral_compile.runtime")


class Artifact:
    """A library loaded on a device with its weights: the VM, the parameters, the metadata.

    ``params`` (name -> array on the device, anything with DLPack, or numpy) replaces the weight
    files: then ``model_dir`` needs only ``mistral-config.json`` (benchmarks and GPU checks with
    random weights made on the device). The weight files are checked against the manifest
    (sizes; with ``verify``, sha256). ``state`` holds the model-owned KV cache's parameters
    (zeros), which the library's parameter tuple includes.
    """

    def __init__(self, model_dir: str | os.PathLike, lib: str | os.PathLike,
                 device: str = "cpu", params: Mapping[str, Any] | None = None,
                 progress: bool = False, verify: bool = False) -> None:
        model_dir, lib = Path(model_dir), Path(lib)
        self.model_dir, self.lib, self.progress = model_dir, lib, progress
        self.config: MistralConfig = read_config(model_dir)
        manifest = None
        if params is None:
            manifest = read_json_object(model_dir / MANIFEST_NAME)
            if manifest.get("config_fingerprint") != self.config.fingerprint():
                raise MistralCompileError(f"{model_dir / MANIFEST_NAME}: weights were converted "
                                          "for a different config than mistral-config.json")
            verify_files(model_dir, manifest, full=verify)
        if not lib.is_file():
            raise MistralCompileError(f"{lib}: library not found")
        self.kind, self.index = parse_device(device)
        self.device = tvm_device(self.kind, self.index)
        declare_all_reduce()  # a sharded library names it; the VM resolves names at load
        self.vm = load_vm(lib, self.device, self.kind)
        self.meta = meta = self._metadata()
        self.layouts = meta.get("param_layouts") or {}  # name -> panel width (CPU libraries)
        self.dtype = meta["dtype"]
        self.quantization = meta["quantization"]
        self.param_dtypes = dict(zip(meta["params"], meta["param_dtypes"], strict=True))
        state = {name: shape for name, shape in zip(meta["params"], meta["param_shapes"],
                                                    strict=True) if name.startswith(STATE_PREFIX)}
        weights = [n for n in meta["params"] if n not in state]
        if manifest is not None:
            if manifest["quantization"] != self.quantization:
                raise MistralCompileError(f"{lib}: library is {self.quantization}, weights are "
                                          f"{manifest['quantization']}")
            loaded = self._load_params(model_dir, manifest, weights)
            self.tokenizer_record = manifest.get("tokenizer") or {}
        else:
            loaded = self._given_params(params, weights)
            # weights given, files perhaps there too (a tensor-parallel shard's are cut from
            # them): the tokenizer recorded at conversion still applies
            converted = model_dir / MANIFEST_NAME
            self.tokenizer_record = ((read_json_object(converted).get("tokenizer") or {})
                                     if converted.is_file() else {})
        self.state = {name: zeros(shape, self.param_dtypes[name], self.device)
                      for name, shape in state.items()}
        by_name = dict(zip(weights, loaded, strict=True))
        # one FFI array, not a Python list: a list (291 tensors for a 7B model) would be
        # converted again on every call
        self.params = tvm.runtime.convert([by_name[n] if n in by_name else self.state[n]
                                           for n in meta["params"]])
        self.weight_bytes = sum(int(np.prod(t.shape)) * tvm.runtime.DataType(t.dtype).bits // 8
                                for t in loaded)

    def _metadata(self) -> dict[str, Any]:
        lib = self.lib
        try:
            meta = read_metadata(self.vm)
        except (AttributeError, ValueError, KeyError) as err:
            raise MistralCompileError(f"{lib}: not a mistral-compile library ({err})") from None
        if meta.get("format_version") != LIBRARY_FORMAT_VERSION:
            raise MistralCompileError(f"{lib}: library format {meta.get('format_version')}, "
                                      f"this version reads {LIBRARY_FORMAT_VERSION}: recompile")
        if meta["config_fingerprint"] != self.config.fingerprint():
            raise MistralCompileError(f"{lib}: library was compiled for a different config "
                                      f"than {self.model_dir / 'mistral-config.json'}")
        if meta["target"] != self.kind:
            raise MistralCompileError(f"{lib}: library was compiled for {meta['target']}, "
                                      f"not {self.kind}")
        if self.kind == "cpu":
            check_cpu(lib, meta)
        shards = meta.get("tensor_parallel_shards") or 1
        if shards > 1 and not all_reduce_bound():
            raise MistralCompileError(f"{lib}: a library of {shards} tensor-parallel shards runs "
                                      f"in {shards} processes, each with its all-reduce bound "
                                      "(runtime/parallel.py)")
        self.config = self.config.with_shards(shards)  # the count is the library's
        return meta

    def _load_params(self, model_dir: Path, manifest: dict, names: list[str]) -> list:
        entries = {p["name"]: p for p in manifest["params"]}
        missing = [n for n in names if n not in entries]
        if missing:
            raise MistralCompileError(f"{model_dir / MANIFEST_NAME}: parameter '{missing[0]}' "
                                      "required by the library is not in the weights")
        from tqdm import tqdm

        files: dict[str, SafetensorsFile] = {}
        params = []
        arena = WeightArena([(entries[n]["shape"], entries[n]["dtype"]) for n in names],
                            self.device)
        for name in tqdm(names, desc="loading weights", unit="tensor", disable=not self.progress,
                         leave=False):
            fname = entries[name]["file"]
            if fname not in files:
                if not (model_dir / fname).is_file():
                    raise MistralCompileError(f"{model_dir / fname}: weight shard not found")
                files[fname] = SafetensorsFile(model_dir / fname)
            stored = files[fname]
            if name not in stored.header or list(stored.shape(name)) != entries[name]["shape"]:
                raise MistralCompileError(f"{stored.path}: tensor '{name}' is not the "
                                          f"{entries[name]['shape']} the manifest lists")
            params.append(arena.put(self.layout(name, stored.get(name))))
        return params

    def layout(self, name: str, array: np.ndarray) -> np.ndarray:
        """A weight as the library reads it: in panels where it says so, else as stored."""
        panel = self.layouts.get(name)
        if panel and array.ndim == 2:
            return pack_rows(array, panel)
        return np.array(array)

    def _given_params(self, given: Mapping[str, Any], names: list[str]) -> list:
        missing = [n for n in names if n not in given]
        if missing:
            raise MistralCompileError(f"params: '{missing[0]}' required by the library is "
                                      f"missing ({len(missing)} missing)")
        out = []
        for name in names:
            value = given[name]
            if isinstance(value, np.ndarray):
                value = to_device(self.layout(name, value), self.device)
            elif not isinstance(value, tvm.runtime.Tensor):
                value = tvm.runtime.from_dlpack(value)
            if str(value.dtype) != self.param_dtypes[name]:
                raise MistralCompileError(f"params: '{name}' is {value.dtype}, the library "
                                          f"expects {self.param_dtypes[name]}")
            out.append(value)
        return out

    def free_device_bytes(self) -> int | None:
        """Free memory on a CUDA device now (None on the CPU)."""
        if self.kind != "cuda":
            return None
        import ctypes

        from mistral_compile.runtime.library import _cudart

        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        _cudart().cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
        return int(free.value)


def stale_library(model_dir: str | os.PathLike, lib: str | os.PathLike,
                  device: str = "cpu") -> str | None:
    """Why ``lib`` cannot run ``model_dir``'s model on ``device`` (None when it can).

    Reads the library's metadata only (no weights): a missing or unloadable file, another
    library format, another config. ``make demo`` recompiles when this is not None.
    """
    lib = Path(lib)
    if not lib.is_file():
        return f"{lib}: library not found"
    try:
        config = read_config(Path(model_dir))
        kind, index = parse_device(device)
        meta = read_metadata(load_vm(lib, tvm_device(kind, index), kind))
    except (MistralCompileError, AttributeError, ValueError, KeyError) as err:
        return str(err)
    if meta.get("format_version") != LIBRARY_FORMAT_VERSION:
        return f"{lib}: library format {meta.get('format_version')}, this version reads " \
               f"{LIBRARY_FORMAT_VERSION}"
    if meta.get("config_fingerprint") != config.fingerprint():
        return f"{lib}: compiled for a different config"
    return None
