"""Programmatic dependent launch: our decode kernels start while the kernel before them drains.

TVM's CUDA launcher calls cuLaunchKernelEx with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_
SERIALIZATION for a kernel whose launch parameters carry the tag below, and a CUDA graph captured
from the stream keeps it as a programmatic edge; but no TVM pass sets the tag from a PrimFunc
attribute (an attribute on the stub does not reach the device function). So the build's TIR
pipeline is TVM's own plus one device pass that adds the tag to each kernel calling a device
function that is written for it (model/kernels.py PDL_EXTERNS: each calls mc::pdl_wait before
touching activations). sm_90 and newer only.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.tirx import compilation_pipeline

from mistral_compile.model.kernels import PDL_EXTERNS

PDL_TAG = "tirx.use_programtic_dependent_launch"  # sic: TVM's spelling
_DYNAMIC_SHARED = "tirx.use_dyn_shared_memory"  # must stay the last launch parameter
PIPELINE = "mistral_compile_pdl"


def calls_pdl_extern(func: tirx.PrimFunc) -> bool:
    """Whether the kernel calls a device function that waits for its predecessor (PDL_EXTERNS).

    Read from the printed kernel: this TVM has no TIR visitor in Python, and an extern's name
    is a string literal there.
    """
    text = func.script()
    return any(f'"{prefix}' in text for prefix in PDL_EXTERNS)


@tirx.transform.prim_func_pass(opt_level=0, name="mistral_compile.TagProgrammaticLaunch")
def tag_programmatic_launch(func: tirx.PrimFunc, _mod: tvm.IRModule,
                            _ctx: tvm.transform.PassContext) -> tirx.PrimFunc:
    """Adds PDL_TAG to the launch parameters of a device kernel that calls a PDL_EXTERNS function."""
    params = func.attrs.get("tirx.kernel_launch_params") if func.attrs else None
    if params is None or not calls_pdl_extern(func):
        return func
    tags = [str(p) for p in params if str(p) != _DYNAMIC_SHARED]
    if PDL_TAG in tags:
        return func
    tags.append(PDL_TAG)
    tags += [_DYNAMIC_SHARED] if any(str(p) == _DYNAMIC_SHARED for p in params) else []
    return func.with_attr("tirx.kernel_launch_params", tags)


def _pipeline_factory():  # noqa: ANN202 - TVM's (pipeline, host passes, device passes) triple
    pipeline, host_passes, device_passes = compilation_pipeline.get_tir_pipeline("s_tir")

    def device_with_tags() -> tvm.transform.Pass:
        return tvm.transform.Sequential([device_passes(), tag_programmatic_launch])

    return pipeline, host_passes, device_with_tags


def register_pipeline() -> str:
    """Registers the TIR pipeline with the PDL tags (idempotent); returns its name."""
    compilation_pipeline.register_tir_pipeline(PIPELINE, _pipeline_factory)
    return PIPELINE


def supported(arch: str) -> bool:
    """Whether the arch (sm_XY) has programmatic dependent launch: sm_90 and newer."""
    digits = "".join(ch for ch in arch.removeprefix("sm_") if ch.isdigit())
    return bool(digits) and int(digits) >= 90
