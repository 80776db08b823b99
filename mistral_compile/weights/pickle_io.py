"""Reading PyTorch pickle checkpoints (.bin/.pth) with torch's weights-only loader, on request."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np

from mistral_compile.errors import MistralCompileError

_NAMES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
          "torch.float64": "F64", "torch.int64": "I64", "torch.int32": "I32"}


class PickleFile:
    """The tensors of one torch pickle file, read with ``torch.load(weights_only=True)``.

    Same interface as ``SafetensorsFile``. torch is imported only here: it is not a dependency of
    mistral-compile, and reading pickles is opt-in (``--allow-pickle``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            import torch
        except ImportError:
            raise MistralCompileError(f"{self.path}: reading pickle checkpoints needs PyTorch "
                                      "(pip install torch), or convert them to safetensors") \
                from None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
            raise MistralCompileError(f"{self.path}: not a readable torch checkpoint "
                                      f"({type(err).__name__}: {err})".splitlines()[0]) from None
        if not isinstance(state, dict) or not all(
                isinstance(v, torch.Tensor) for v in state.values()):
            raise MistralCompileError(f"{self.path}: expected a flat dict of tensors")
        self._tensors = state
        self._torch = torch

    def keys(self) -> list[str]:
        return list(self._tensors)

    def dtype_name(self, name: str) -> str:
        return _NAMES.get(str(self._tensors[name].dtype), str(self._tensors[name].dtype))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name].contiguous()
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
