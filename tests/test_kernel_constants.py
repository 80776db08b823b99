"""Kernel constants that live both in mc_kernels.cuh and in Python are equal (issue 20, item 5)."""

import re

import pytest

from mistral_compile import abi
from mistral_compile.compiler import cuda
from mistral_compile.model import kernels, kv_owned, sampler

HEADER = (cuda.__file__.rsplit("/", 1)[0] + "/csrc/mc_kernels.cuh")


def header_constants() -> dict[str, int]:
    """Every namespace-level ``constexpr int A = ..., B = ...;`` of the header, evaluated."""
    values: dict[str, int] = {}
    text = open(HEADER).read()
    for match in re.finditer(r"^constexpr int ([^;]+);", text, flags=re.M):
        for item in match.group(1).split(","):
            name, expr = (part.strip() for part in item.split("=", 1))
            expr = expr.replace("/", "//")  # C integer division
            values[name] = eval(expr, {"__builtins__": {}}, dict(values))  # noqa: S307
    return values


C = header_constants()

PAIRS = [
    # wgmma GEMM: tile, threads, dynamic shared memory, TMA descriptors
    ("WG_BM", kernels.WG_BM), ("WG_BN", kernels.WG_BN), ("WG_THREADS", kernels.WG_THREADS),
    ("WG_SMEM_BYTES", kernels.WG_SMEM), ("TMA_MAP_WORDS", kernels.TMA_MAPS_BYTES // 2 // 8),
    ("GEMM_BM", kernels.GEMM_TILE), ("GEMM_BN", kernels.GEMM_TILE),
    # epilogues and GEMV modes
    ("GEMM_PLAIN", kernels.GEMM_EPILOGUES["plain"]),
    ("GEMM_RESIDUAL", kernels.GEMM_EPILOGUES["residual"]),
    ("GEMM_SILU", kernels.GEMM_EPILOGUES["silu"]), ("GEMM_PARTIAL", kernels.GEMM_PARTIAL),
    ("GEMV_PLAIN", kernels.GEMV_MODES["plain"]), ("GEMV_NORM", kernels.GEMV_MODES["norm"]),
    ("GEMV_RESIDUAL", kernels.GEMV_MODES["residual"]),
    ("GEMV_NORM_SILU", kernels.GEMV_MODES["norm_silu"]), ("GEMV_SILU", kernels.GEMV_MODES["silu"]),
    ("GEMV_WARPS", kernels.GEMV_WARPS), ("GEMV_STATIC_X_BYTES", kernels.GEMV_STATIC_X_BYTES),
    # skinny GEMM, flash-attention prefill, sampler
    ("SK_SLAB", kernels.SKINNY_SLAB), ("SK_WARPS", kernels.SKINNY_WARPS),
    ("FA_BR", kernels.FA_ROWS), ("FA_THREADS", kernels.FA_THREADS), ("FA_BC", kv_owned.TILE),
    ("FW_D", kv_owned.FW_D), ("FW_BM", kv_owned.FW_ROWS), ("FW_THREADS", kv_owned.FW_THREADS),
    ("FW_SMEM_BYTES", kv_owned.FW_SMEM), ("TMA_MAP_WORDS", kv_owned.TMA_MAP_BYTES // 8),
    ("SAMPLE_THREADS", sampler.SAMPLE_THREADS),
    ("OPT_TEMPERATURE", abi.OPT_TEMPERATURE), ("OPT_TOP_P", abi.OPT_TOP_P),
    ("OPT_TOP_K", abi.OPT_TOP_K), ("OPT_MIN_P", abi.OPT_MIN_P),
    ("OPT_REPETITION", abi.OPT_REPETITION), ("OPT_PRESENCE", abi.OPT_PRESENCE),
    ("OPT_FREQUENCY", abi.OPT_FREQUENCY), ("NUM_OPTIONS", abi.NUM_OPTIONS),
    ("SINK_COLUMNS", abi.SINK_COLUMNS),  # the batched step's attention sinks
]


@pytest.mark.parametrize(("name", "python"), PAIRS, ids=[p[0] for p in PAIRS])
def test_header_and_python_agree(name, python):
    assert C[name] == python, f"mc_kernels.cuh {name} = {C[name]}, Python has {python}"


def test_every_mode_and_epilogue_of_the_header_is_known_to_python():
    # a mode added on one side only would be a kernel the model cannot ask for, or a number the
    # header does not know
    gemv = {k for k in C if k.startswith("GEMV_") and k not in ("GEMV_WARPS",
                                                                  "GEMV_STATIC_X_BYTES")}
    gemm = {k for k in C if re.fullmatch(r"GEMM_(PLAIN|RESIDUAL|SILU|PARTIAL)", k)}
    assert sorted(C[k] for k in gemv) == sorted(kernels.GEMV_MODES.values())
    assert sorted(C[k] for k in gemm) == sorted([*kernels.GEMM_EPILOGUES.values(),
                                                 kernels.GEMM_PARTIAL])
