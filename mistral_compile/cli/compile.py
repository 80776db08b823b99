"""`mistral-compile compile`: arguments for compiler.compile_model."""

from __future__ import annotations

import argparse

from mistral_compile.compiler.devices import CPU_CHOICES, CUDA_ARCHS, DEFAULT_CUDA_ARCH, DEVICES


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    parser = commands.add_parser(
        "compile", help="compile a converted model into a TVM library",
        description="Lower MODEL_DIR (a convert-weight output, or a convert-config output with "
                    "--quantization) to a shared library that embeds the fingerprint of the "
                    "config it was compiled for. --device cuda needs nvcc but no GPU.")
    parser.add_argument("model_dir", metavar="MODEL_DIR")
    parser.add_argument("-o", "--output", required=True, metavar="LIB.so")
    parser.add_argument("--device", default="cpu", choices=DEVICES,
                        help="cpu (llvm) or cuda (needs nvcc; no GPU or driver needed)")
    parser.add_argument("--arch", choices=CUDA_ARCHS, default=None,
                        help=f"CUDA architecture for --device cuda (default {DEFAULT_CUDA_ARCH})")
    parser.add_argument("--cpu", choices=CPU_CHOICES, default=None,
                        help="x86-64 level for --device cpu (default native: the best this "
                             "machine runs; a library refuses to load on a CPU without it). "
                             "x86-64-v3 = AVX2/FMA (2013+), x86-64-v4 = AVX-512")
    parser.add_argument("--quantization", default=None,
                        help="weight format (q0f32, q0f16, q4f16_1, q4f16_2); needed when "
                             "MODEL_DIR holds only mistral-config.json, else taken from its "
                             "weights")
    parser.add_argument("--tensor-parallel-shards", type=int, default=None, metavar="N",
                        help="the library of one of N tensor-parallel shards (default: the "
                             "config's, 1 unless convert-config set it); the same converted "
                             "weights serve every N")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="capture decode's static kernel runs in CUDA graphs and replay "
                             "them (default: on for --device cuda; docs/benchmarks.md)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Compile and print per-phase timings."""
    from mistral_compile.compiler.pipeline import compile_model  # imports TVM: only when compiling

    timings = compile_model(args.model_dir, args.output, args.device, args.arch,
                            args.quantization, args.cuda_graph, args.cpu,
                            tensor_parallel_shards=args.tensor_parallel_shards)
    for phase, seconds in timings.items():
        print(f"{phase:<44} {seconds:6.2f} s")
    print(f"wrote {args.output}")
    return 0
