"""CUDA builds without a GPU: load TVM's CUDA runtime over a driver stand-in, compile with nvcc."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import tvm_ffi

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.library import prepare_runtime

logger = logging.getLogger("mistral_compile.compiler")

FATBIN_MAGIC = b"\x50\xed\x55\xba"  # 0xBA55ED50, little-endian
_STUB_SOURCE = Path(__file__).with_name("csrc") / "libcuda_stub.c"
_KERNELS_HEADER = Path(__file__).with_name("csrc") / "mc_kernels.cuh"
_loaded = False


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mistral_compile"


def find_nvcc() -> Path:
    """Locate nvcc: $CUDA_HOME/bin, $CUDA_PATH/bin, else the PATH."""
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if base and (Path(base) / "bin" / "nvcc").is_file():
            return Path(base) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found is None:
        raise MistralCompileError("--device cuda needs nvcc (the CUDA toolkit): not found on "
                                  "the PATH or under $CUDA_HOME/bin")
    return Path(found).resolve()


def _driver_stub() -> Path:
    """Build (once, cached by source hash) the libcuda.so.1 stand-in with gcc."""
    source = _STUB_SOURCE.read_bytes()
    out = _cache_dir() / f"libcuda-stub-{hashlib.sha256(source).hexdigest()[:12]}" / "libcuda.so.1"
    if out.is_file():
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise MistralCompileError("--device cuda on a machine without a GPU driver needs a C "
                                  "compiler (gcc) to build the driver stand-in")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / "libcuda.so.1"
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(built),
                        str(_STUB_SOURCE)], check=True, capture_output=True)
        os.replace(built, out)
    return out


def load_cuda_runtime() -> None:
    """Load libcuda (the real driver, else the stand-in), libcudart and TVM's CUDA runtime."""
    global _loaded
    if _loaded or tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True):
        _loaded = True
        return
    nvcc = find_nvcc()
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        logger.info("CUDA driver found: using it")
    except OSError:
        stub = _driver_stub()
        logger.info("no CUDA driver: loading the build-only stand-in %s", stub)
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
    toolkits = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                str(nvcc.parent.parent), "/usr/local/cuda"]
    prepare_runtime("cuda", [t for t in toolkits if t])
    if not tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True):
        raise MistralCompileError("TVM's CUDA runtime loaded but registered no CUDA module "
                                  "support; the build would embed CUDA source")
    _loaded = True


def gencode_flags(arch: str) -> list[str]:
    """The nvcc flags for machine code of exactly ``arch`` (no PTX, so no driver JIT).

    sm_90 builds as sm_90a (the same chips, H100/H200/GH200) so that the prefill GEMM can use
    Hopper's warpgroup MMA (model/kernels.py gemm).
    """
    digits = arch.removeprefix("sm_")
    digits = "90a" if digits == "90" else digits
    return ["-gencode", f"arch=compute_{digits},code=sm_{digits}"]


def register_nvcc_callback(arch: str) -> None:
    """Make TVM compile generated CUDA C with nvcc into a fatbin for ``arch``."""
    nvcc = find_nvcc()

    def compile_cuda(code: str, *_ignored: object) -> bytes:
        if "mc::" in code:  # our kernels' TIR stubs call into the hand-written device code
            code = _KERNELS_HEADER.read_text() + "\n" + code
        if os.environ.get("MISTRAL_COMPILE_DUMP_CUDA"):
            Path(os.environ["MISTRAL_COMPILE_DUMP_CUDA"]).write_text(code)
        with tempfile.TemporaryDirectory(prefix="mistral-compile-nvcc-") as tmp:
            src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
            src.write_text(code)
            cmd = [str(nvcc), "--fatbin", "-O3", *gencode_flags(arch), "-o", str(out), str(src)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            logger.debug("nvcc %s: %d bytes of CUDA C in %.1f s", arch, len(code),
                         time.perf_counter() - start)
            if proc.returncode != 0:  # the error lines, not the warnings that precede them
                lines = (proc.stderr or proc.stdout).strip().splitlines()
                errors = [line for line in lines if "error" in line] or lines
                raise MistralCompileError(f"nvcc failed for {arch}: "
                                          f"{chr(10).join(errors)[:2000]}")
            data = out.read_bytes()
        if not data.startswith(FATBIN_MAGIC):
            raise MistralCompileError("nvcc did not produce a fatbin")
        return data

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def fatbin_archs(blob: bytes) -> list[tuple[str, int]]:
    """(kind, sm) of each entry of every fatbin found in ``blob``: kind "elf" or "ptx"."""
    found = []
    at = blob.find(FATBIN_MAGIC)
    while at >= 0:
        header_size = int.from_bytes(blob[at + 6:at + 8], "little")
        fat_size = int.from_bytes(blob[at + 8:at + 16], "little")
        entry, end = at + header_size, at + header_size + fat_size
        while entry < end:
            kind = int.from_bytes(blob[entry:entry + 2], "little")
            entry_header = int.from_bytes(blob[entry + 4:entry + 8], "little")
            payload = int.from_bytes(blob[entry + 8:entry + 16], "little")
            sm = int.from_bytes(blob[entry + 28:entry + 32], "little")
            found.append(({1: "ptx", 2: "elf"}.get(kind, f"kind{kind}"), sm))
            if entry_header == 0:
                break
            entry += entry_header + payload
        at = blob.find(FATBIN_MAGIC, max(end, at + 4))
    return found
