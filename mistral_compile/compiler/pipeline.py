"""compile: the phases that lower a converted model to a TVM library, as a readable list."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from mistral_compile.abi import PAGE_SIZE
from mistral_compile.compiler.devices import CPU_LEVELS, DEVICES, resolve_cpu
from mistral_compile.config import MistralConfig, read_config
from mistral_compile.errors import ConfigError, MistralCompileError
from mistral_compile.io import ensure_dir, read_json_object
from mistral_compile.runtime.library import LIBRARY_FORMAT_VERSION, METADATA_FUNC

logger = logging.getLogger("mistral_compile.compiler")



@dataclass
class CompileState:
    """What the phases pass along."""

    config: MistralConfig
    dtype: str
    target: tvm.target.Target
    output: Path
    quantization: str | None = None
    cuda_graph: bool = False
    cpu_level: str | None = None  # CPU builds: the x86-64 level (compiler/devices.py)
    param_layouts: dict[str, int] = field(default_factory=dict)  # name -> panel width (CPU)
    mod: Any = None
    param_names: list[str] = field(default_factory=list)
    param_shapes: list[list[int]] = field(default_factory=list)
    param_dtypes: list[str] = field(default_factory=list)
    executable: Any = None
    timings: dict[str, float] = field(default_factory=dict)


def _export(state: CompileState) -> None:
    from mistral_compile.model import MistralForCausalLM

    config = state.config
    if config.tensor_parallel_shards > 1:  # one shard's model: its heads, all-reduces added
        from mistral_compile.model.parallel import check_shardable, local_config

        check_shardable(config, state.quantization)
        config = local_config(config)
    model = MistralForCausalLM(config, quantization=state.quantization)
    if state.config.tensor_parallel_shards > 1:
        from mistral_compile.model.parallel import TensorParallel

        TensorParallel().visit("", model)
    model.to(state.dtype)
    if state.target.kind.name == "cuda":  # before export: an error inside it leaves TVM noise
        from mistral_compile.model.kv_owned import check_cuda_shape

        check_cuda_shape(config, state.dtype)
    else:  # our CPU kernels read projection weights in panels
        from mistral_compile.model.cpu_kernels import cpu_tile
        from mistral_compile.model.cpu_layout import store_in_panels

        state.param_layouts = store_in_panels(model, cpu_tile()[0])
    mod, params, _ = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    state.param_names = [name for name, _ in params]
    state.param_shapes = [[int(d) for d in p.shape] for _, p in params]
    state.param_dtypes = [str(p.dtype) for _, p in params]
    state.mod = mod


def _attach_metadata(state: CompileState) -> None:
    meta = {"format_version": LIBRARY_FORMAT_VERSION,
            "config_fingerprint": state.config.fingerprint(), "dtype": state.dtype,
            "target": "cuda" if state.target.kind.name == "cuda" else "cpu",
            "arch": state.target.arch if state.target.kind.name == "cuda" else None,
            "cuda_graph": state.cuda_graph, "quantization": state.quantization,
            "cpu_level": state.cpu_level,
            "cpu_flags": list(CPU_LEVELS[state.cpu_level]) if state.cpu_level else None,
            "param_layouts": state.param_layouts,
            "tensor_parallel_shards": state.config.tensor_parallel_shards,
            "params": state.param_names, "param_shapes": state.param_shapes,
            "param_dtypes": state.param_dtypes, "page_size": PAGE_SIZE}
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    bb = relax.BlockBuilder()
    with bb.function(METADATA_FUNC, []):
        bb.emit_func_output(relax.const(blob, "uint8"))
    state.mod[METADATA_FUNC] = bb.get()[METADATA_FUNC]


def _mark_no_tensorize(state: CompileState) -> None:
    # TVM 0.27's dlight gpu.Matmul crashes (segfault in Tensorize, wmma f16 intrinsics) on fp16
    # matmuls with a dynamic dimension over 64, i.e. every prefill matmul; the attribute keeps it
    # on the SIMT schedule (correct, slower: tensor cores are the performance issue's job).
    if state.target.kind.name != "cuda":
        return
    for gvar, func in list(state.mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            state.mod[gvar] = func.with_attr("dlight.do_not_tensorize", True)


@tvm.transform.module_pass(opt_level=0, name="UnpackParamsLate")
def unpack_params_late(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """Move each ``params[i]`` to just before its first use, in every exported function.

    The functions take the weights as one packed tuple, and the VM unpacks each element with
    one instruction. Unpacked at the top (as exported), a 7B decode step ran 291 of them
    (about 90 us on the host) before its first kernel; unpacked where used, the first kernel
    launches at once and the rest of the unpacking overlaps the GPU's work.
    """
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function) or not func.params:
            continue
        packed = func.params[-1]
        blocks = []
        for block in func.body.blocks:
            unpack = {b.var: b for b in block.bindings if isinstance(b, relax.VarBinding)
                      and isinstance(b.value, relax.TupleGetItem)
                      and b.value.tuple_value.same_as(packed)}
            if not unpack:
                blocks.append(block)
                continue
            bindings = []
            for b in block.bindings:
                if b.var in unpack:
                    continue
                for v in relax.analysis.free_vars(b.value):
                    if v in unpack:
                        bindings.append(unpack.pop(v))
                bindings.append(b)
            bindings = list(unpack.values()) + bindings  # unused ones stay (at the top)
            blocks.append(type(block)(bindings, block.span))
        body = relax.SeqExpr(blocks, func.body.body, func.body.span)
        mod[gvar] = relax.Function(func.params, body, func.ret_ty, func.is_pure,
                                   func.attrs, func.span)
    return mod


def _pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    if target.kind.name != "cuda":
        return tvm.transform.Sequential([unpack_params_late,
                                         relax.get_default_pipeline(target)])
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0, name="MistralCompileCUDA")
    def run(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        mod = unpack_params_late(mod)
        # x @ permute_dims(W) as one "NT_matmul": the form dlight's GEMV rule schedules for decode
        fuse = [relax.transform.FuseTransposeMatmul(),
                relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(),
                relax.transform.FuseTIR()]
        mod = tvm.transform.Sequential(cuda.library_dispatch_passes(target) + fuse)(mod)
        state = CompileState(config=None, dtype="", target=target, output=Path(), mod=mod)
        _mark_no_tensorize(state)
        schedule = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                           dl.gpu.GeneralReduction(), dl.gpu.Fallback())
        return tvm.transform.Sequential([schedule] + cuda.dataflow_lower_passes(target)
                                        + cuda.finalize_passes(target))(state.mod)

    return run


def _build(state: CompileState) -> None:
    if state.target.kind.name == "cuda":
        from mistral_compile.compiler import cuda

        cuda.load_cuda_runtime()
        cuda.register_nvcc_callback(state.target.arch)
    # with CUDA graphs, RewriteCUDAGraph captures the static-shape kernel runs of each function
    # (decode) on first use and replays them, cutting launch overhead
    config = {"relax.backend.use_cuda_graph": state.cuda_graph}
    with tvm.transform.PassContext(opt_level=tvm.transform.PassContext.current().opt_level,
                                   config=config):
        state.executable = relax.build(state.mod, target=state.target,
                                       relax_pipeline=_pipeline(state.target))


def _export_library(state: CompileState) -> None:
    ensure_dir(state.output.parent)
    tmp = state.output.with_name(f".{state.output.name}.partial")
    try:
        state.executable.export_library(str(tmp))
        if state.target.kind.name == "cuda":
            _check_machine_code(tmp, state.target.arch)
        os.replace(tmp, state.output)
    finally:
        tmp.unlink(missing_ok=True)


def _check_machine_code(lib: Path, arch: str) -> None:
    """The library must hold a fatbin with ``arch`` machine code, and no CUDA source or PTX."""
    from mistral_compile.compiler.cuda import fatbin_archs

    blob = lib.read_bytes()
    entries = fatbin_archs(blob)
    want = int(arch.removeprefix("sm_").rstrip("a"))
    if not entries or b'extern "C" __global__' in blob:
        raise MistralCompileError(f"{lib.name}: the build embedded CUDA source instead of a "
                                  "fatbin (TVM's CUDA runtime was not active): refusing it")
    wrong = [e for e in entries if e != ("elf", want)]
    if wrong:
        raise MistralCompileError(f"{lib.name}: fatbin holds {wrong}, expected only {arch} "
                                  "machine code")


PHASES: list[tuple[str, Callable[[CompileState], None]]] = [
    ("export Relax model", _export),
    ("attach metadata", _attach_metadata),
    ("build (legalize, fuse, schedule, codegen)", _build),
    ("export library (+ machine-code check)", _export_library),
]


def make_target(device: str, arch: str | None = None,
                cpu: str | None = None) -> tvm.target.Target:
    """The TVM target for a --device value (and --arch for cuda, --cpu for cpu)."""
    host = {"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu"}
    if device == "cpu":
        if arch is not None:
            raise MistralCompileError("--arch applies to --device cuda only")
        level = resolve_cpu(cpu)
        if level not in CPU_LEVELS:
            raise MistralCompileError(f"--cpu {cpu!r} is not supported (choose from native, "
                                      f"{', '.join(CPU_LEVELS)})")
        return tvm.target.Target({**host, "mcpu": level} if level != "x86-64" else host)
    if cpu is not None:
        raise MistralCompileError("--cpu applies to --device cpu only")
    if device == "cuda":
        from mistral_compile.compiler.devices import CUDA_ARCHS, DEFAULT_CUDA_ARCH

        arch = arch or DEFAULT_CUDA_ARCH
        if arch not in CUDA_ARCHS:
            raise MistralCompileError(f"--arch {arch!r} is not supported (choose from "
                                      f"{', '.join(CUDA_ARCHS)})")
        return tvm.target.Target({"kind": "cuda", "arch": arch, "max_num_threads": 1024,
                                  "thread_warp_size": 32}, host=host)
    raise MistralCompileError(f"--device {device!r} is not supported (choose from "
                              f"{', '.join(DEVICES)})")


def compile_model(model_dir: str | os.PathLike, output: str | os.PathLike,
                  device: str = "cpu", arch: str | None = None,
                  quantization: str | None = None,
                  cuda_graph: bool | None = None, cpu: str | None = None,
                  tensor_parallel_shards: int | None = None) -> dict[str, float]:
    """Compile MODEL_DIR into the library OUTPUT; returns per-phase timings.

    MODEL_DIR is a convert-weight output (its manifest gives the dtype), or a directory with only
    ``mistral-config.json`` (convert-config's output) plus ``quantization``: libraries hold no
    weights. ``device`` is "cpu" (llvm; ``cpu``: native, the default, or an x86-64 level the
    library will need, checked when it loads) or "cuda" (``arch`` default sm_90; nvcc only).
    """
    from mistral_compile.weights.convert import MANIFEST_NAME, QUANTIZATIONS

    model_dir, output = Path(model_dir), Path(output)
    config = read_config(model_dir)
    if tensor_parallel_shards is not None:  # the library's count; the weights serve any
        try:
            config = config.with_shards(tensor_parallel_shards)
        except ConfigError as err:
            raise MistralCompileError(f"--tensor-parallel-shards {tensor_parallel_shards}: "
                                      f"{err.detail}") from None
    stored = None
    if (model_dir / MANIFEST_NAME).is_file():
        stored = read_json_object(model_dir / MANIFEST_NAME)["quantization"]
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise MistralCompileError(f"--quantization {quantization!r} is not supported "
                                      f"(choose from {', '.join(QUANTIZATIONS)})")
        if stored is not None and stored != quantization:
            raise MistralCompileError(f"--quantization {quantization}: the weights in "
                                      f"{model_dir} are {stored}")
    quantization = quantization or stored
    if quantization is None:
        raise MistralCompileError(f"{model_dir / MANIFEST_NAME}: not found; compiling from a "
                                  "config alone needs --quantization")
    dtype = QUANTIZATIONS[quantization]
    if cuda_graph and device != "cuda":
        raise MistralCompileError("--cuda-graph applies to --device cuda only")
    sharded = config.tensor_parallel_shards > 1
    if cuda_graph and sharded:
        raise MistralCompileError("--cuda-graph: a tensor-parallel library's all-reduce is a "
                                  "host call, which a CUDA graph cannot capture")
    if cuda_graph is None:  # default: on for CUDA (decode -7..9% on the H100, same logits)
        cuda_graph = device == "cuda" and not sharded
    target = make_target(device, arch, cpu)
    ensure_dir(output.parent)  # before the build, not after it (every argument checked first)
    state = CompileState(config=config, dtype=dtype, target=target,
                         output=output, quantization=quantization, cuda_graph=cuda_graph,
                         cpu_level=resolve_cpu(cpu) if device == "cpu" else None)
    with state.target:
        for name, phase in PHASES:
            start = time.perf_counter()
            phase(state)
            state.timings[name] = time.perf_counter() - start
            logger.debug("%-44s %6.2f s", name, state.timings[name])
    return state.timings
