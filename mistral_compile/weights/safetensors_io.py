"""Zero-copy reading of safetensors files into numpy, bfloat16 included (via ml_dtypes)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from mistral_compile.errors import MistralCompileError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "U32": np.uint32, "BOOL": np.bool_}


class SafetensorsFile:
    """The tensors of one .safetensors file, memory-mapped; ``get`` returns a read-only view."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MistralCompileError(f"{self.path}: not a readable safetensors file "
                                      f"({err})") from None
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self._offset = 8 + size
        self._data: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype_name(self, name: str) -> str:
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise MistralCompileError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                      f"{info['dtype']}")
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._data[self._offset + begin:self._offset + end]
        return raw.view(dtype).reshape(info["shape"])
