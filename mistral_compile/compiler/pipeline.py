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

from mistral_compile.compiler.devices import DEVICES
from mistral_compile.config import MistralConfig, read_config
from mistral_compile.errors import MistralCompileError
from mistral_compile.io import read_json_object

logger = logging.getLogger("mistral_compile.compiler")

METADATA_FUNC = "_metadata"
LIBRARY_FORMAT_VERSION = 1


@dataclass
class CompileState:
    """What the phases pass along."""

    config: MistralConfig
    dtype: str
    target: tvm.target.Target
    mod: Any = None
    param_names: list[str] = field(default_factory=list)
    executable: Any = None
    timings: dict[str, float] = field(default_factory=dict)


def _export(state: CompileState) -> None:
    from mistral_compile.model import MistralForCausalLM

    model = MistralForCausalLM(state.config)
    model.to(state.dtype)
    mod, params, _ = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    state.param_names = [name for name, _ in params]
    state.mod = mod


def _attach_metadata(state: CompileState) -> None:
    meta = {"format_version": LIBRARY_FORMAT_VERSION,
            "config_fingerprint": state.config.fingerprint(), "dtype": state.dtype,
            "target": str(state.target.kind.name), "params": state.param_names}
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    bb = relax.BlockBuilder()
    with bb.function(METADATA_FUNC, []):
        bb.emit_func_output(relax.const(blob, "uint8"))
    state.mod[METADATA_FUNC] = bb.get()[METADATA_FUNC]


def _build(state: CompileState) -> None:
    state.executable = relax.build(state.mod, target=state.target)


PHASES: list[tuple[str, Callable[[CompileState], None]]] = [
    ("export Relax model", _export),
    ("attach metadata", _attach_metadata),
    ("build (legalize, fuse, lower, codegen)", _build),
]


def read_metadata(vm: relax.VirtualMachine) -> dict[str, Any]:
    """The metadata a library was compiled with (config fingerprint, dtype, parameter order)."""
    return json.loads(vm[METADATA_FUNC]().numpy().tobytes().decode())


def make_target(device: str) -> tvm.target.Target:
    """The TVM target for a --device value."""
    if device == "cpu":
        return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu"})
    raise MistralCompileError(f"--device {device!r} is not supported yet (choose from "
                              f"{', '.join(DEVICES)})")


def compile_model(model_dir: str | os.PathLike, output: str | os.PathLike,
                  device: str = "cpu") -> dict[str, float]:
    """Compile MODEL_DIR (a convert-weight output) into the library OUTPUT; returns timings."""
    from mistral_compile.weights.convert import MANIFEST_NAME

    model_dir, output = Path(model_dir), Path(output)
    config = read_config(model_dir)
    manifest = read_json_object(model_dir / MANIFEST_NAME)
    state = CompileState(config=config, dtype=manifest["dtype"], target=make_target(device))
    with state.target:
        for name, phase in PHASES:
            start = time.perf_counter()
            phase(state)
            state.timings[name] = time.perf_counter() - start
            logger.info("%-40s %6.2f s", name, state.timings[name])
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    state.executable.export_library(str(tmp))
    os.replace(tmp, output)
    return state.timings
