"""Safetensors files whose header lies are refused in one line before any data is read."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from mistral_compile.errors import MistralCompileError
from mistral_compile.weights.safetensors_io import SafetensorsFile


def _write(path, header, data=b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.ones(4, dtype=np.float16)}, str(path))
    return path


def test_a_good_file_reads(good):
    f = SafetensorsFile(good)
    assert f.get("a").tolist() == [[0, 1, 2], [3, 4, 5]] and f.get("b").dtype == np.float16


@pytest.mark.parametrize("cut", [1, 10, 0.5])
def test_truncated_files(good, tmp_path, cut):
    data = good.read_bytes()
    keep = len(data) - cut if isinstance(cut, int) else int(len(data) * cut)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:keep])
    with pytest.raises(MistralCompileError, match=r"cut\.safetensors: not a valid safetensors "
                       r"file: (tensor '[ab]': data range|header length)"):
        SafetensorsFile(path)


def test_truncated_right_after_the_header(good, tmp_path):
    data = good.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    path = tmp_path / "head.safetensors"
    path.write_bytes(data[:8 + size])
    with pytest.raises(MistralCompileError, match="outside the file's 0 data bytes"):
        SafetensorsFile(path)


@pytest.mark.parametrize("header, data, text", [
    (None, b"", "header length 1099511627776 exceeds the file"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12),
     "tensors 'a' and 'b' overlap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8),
     r"8 data bytes, its shape \[3\] and dtype F32 need 12"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8000]}}, bytes(8),
     r"data range \[0, 8000\) is outside"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8),
     "field 'shape' must be"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "field 'data_offsets' must be"),
    ({"a": 7}, b"", "entry is not an object"),
    ([1, 2], b"", "the header is not a JSON object"),
])
def test_lying_headers(tmp_path, header, data, text):
    path = tmp_path / "lie.safetensors"
    if header is None:  # a header length far beyond the file (once a MemoryError)
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    else:
        _write(path, header, data)
    with pytest.raises(MistralCompileError, match=text) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_shorter_than_the_length_field(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(MistralCompileError, match="shorter than the 8-byte header length"):
        SafetensorsFile(path)
