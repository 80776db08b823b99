"""GGUF files (llama.cpp, ollama) read with the `gguf` package: metadata and dequantized tensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mistral_compile.errors import MistralCompileError

# llama.cpp tensor types we dequantize (the gguf package's own reference dequantization)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")


def is_gguf(path: str | os.PathLike) -> bool:
    """A file whose name ends in .gguf, or that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


class GGUFFile:
    """One GGUF file: ``meta(key)`` for its metadata, and tensors as a SafetensorsFile offers.

    Tensor shapes are numpy's ([out, in] for a projection); ``get`` returns float32, dequantized.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except FileNotFoundError:
            raise MistralCompileError(f"{self.path}: file not found") from None
        except Exception as err:  # noqa: BLE001 - the reader raises ValueError, IndexError ...
            raise MistralCompileError(f"{self.path}: not a readable GGUF file "
                                      f"({type(err).__name__}: {err})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    # ---------------------------------------------------------------- metadata
    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def meta(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python data (strings decoded, arrays as lists), or ``default``."""
        from gguf import GGUFValueType

        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            if field.types[0] == GGUFValueType.ARRAY and field.types[-1] != GGUFValueType.STRING:
                return [field.parts[i].tolist()[0] for i in field.data]
            value = field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as err:
            raise MistralCompileError(f"{self.path}: field '{key}': cannot be read ({err})") \
                from None
        return value

    def architecture(self) -> str:
        arch = self.meta("general.architecture")
        if not isinstance(arch, str):
            raise MistralCompileError(f"{self.path}: field 'general.architecture': missing")
        return arch

    # ---------------------------------------------------------------- tensors
    def keys(self) -> list[str]:
        return list(self.tensors)

    def ggml_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def dtype_name(self, name: str) -> str:
        """The dtype ``get`` returns (F32: every supported type is dequantized to float32)."""
        kind = self.ggml_type(name)
        if kind not in SUPPORTED_TYPES:
            raise MistralCompileError(f"{self.path}: tensor '{name}' has type {kind}, which is "
                                      f"not supported (supported: {', '.join(SUPPORTED_TYPES)})")
        return "F32"

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def q4_blocks(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A Q4_0 / Q4_1 tensor as stored: codes, scales and minimums; None for other types.

        Codes are uint8 [rows, k], scales and minimums float16 [rows, k / 32], and a value is
        code * scale + min.
        Q4_1 blocks hold (scale, min, 16 bytes of codes); Q4_0 blocks (scale, 16 bytes) with
        value = (code - 8) * scale, i.e. min = -8 * scale (exact in float16). In a block's
        bytes, code j (< 16) is the low nibble of byte j and code j + 16 its high nibble.
        """
        kind = self.ggml_type(name)
        if kind not in ("Q4_0", "Q4_1"):
            return None
        rows, k = self.shape(name)
        head = 4 if kind == "Q4_1" else 2
        raw = np.asarray(self.tensors[name].data, dtype=np.uint8).reshape(rows, k // 32,
                                                                          head + 16)
        scale = raw[..., 0:2].copy().view(np.float16)[..., 0]
        q_min = raw[..., 2:4].copy().view(np.float16)[..., 0] if kind == "Q4_1" else \
            (scale.astype(np.float32) * -8).astype(np.float16)
        qs = raw[..., head:]
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, k)
        return codes, scale, q_min

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        self.dtype_name(name)
        try:
            out = dequantize(tensor.data, tensor.tensor_type)
        except (ValueError, IndexError, NotImplementedError) as err:
            raise MistralCompileError(f"{self.path}: tensor '{name}' cannot be dequantized "
                                      f"({err})") from None
        out = np.asarray(out, dtype=np.float32)
        if out.shape != self.shape(name):
            raise MistralCompileError(f"{self.path}: tensor '{name}' holds {out.shape} values, "
                                      f"its header says {self.shape(name)} (truncated file?)")
        return out
