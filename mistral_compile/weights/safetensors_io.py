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


_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


class SafetensorsFile:
    """The tensors of one .safetensors file, memory-mapped; ``get`` returns a read-only view.

    The header is checked against the file before any data is touched: its length, every
    tensor's dtype, shape and data range (inside the data section, the size its shape and dtype
    need, no two ranges overlapping). A file that lies fails here, in one line naming it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            file_size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                head = handle.read(8)
                if len(head) < 8:
                    self._fail(f"{file_size} bytes: shorter than the 8-byte header length")
                (size,) = struct.unpack("<Q", head)
                if size > min(_MAX_HEADER, file_size - 8):
                    self._fail(f"header length {size} exceeds the file ({file_size} bytes)")
                header = json.loads(handle.read(size))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MistralCompileError(f"{self.path}: not a readable safetensors file "
                                      f"({err})") from None
        if not isinstance(header, dict):
            self._fail("the header is not a JSON object")
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self._offset = 8 + size
        self._check(file_size - self._offset)
        self._data: np.memmap | None = None

    def _fail(self, detail: str) -> None:
        raise MistralCompileError(f"{self.path}: not a valid safetensors file: {detail}")

    def _check(self, data_size: int) -> None:
        """Every entry well-formed, inside the data section, sized by its shape, disjoint."""
        ranges = []
        for name, info in self.header.items():
            where = f"tensor '{name}'"
            if not isinstance(info, dict):
                self._fail(f"{where}: entry is not an object")
            dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if not isinstance(dtype, str):
                self._fail(f"{where}: field 'dtype' missing")
            if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(
                    d, bool) and d >= 0 for d in shape)):
                self._fail(f"{where}: field 'shape' must be a list of non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                    isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
                self._fail(f"{where}: field 'data_offsets' must be [begin, end]")
            begin, end = offsets
            if not 0 <= begin <= end <= data_size:
                self._fail(f"{where}: data range [{begin}, {end}) is outside the file's "
                           f"{data_size} data bytes (truncated?)")
            known = _DTYPES.get(dtype)
            if known is not None:
                need = int(np.prod(shape, dtype=np.int64)) * np.dtype(known).itemsize
                if end - begin != need:
                    self._fail(f"{where}: {end - begin} data bytes, its shape {shape} and dtype "
                               f"{dtype} need {need}")
            ranges.append((begin, end, name))
        ranges.sort()
        for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:], strict=False):
            if begin < end:
                self._fail(f"tensors '{first}' and '{second}' overlap in the data section")

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
