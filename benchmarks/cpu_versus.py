"""Ours against transformers on this CPU, same real weights (SmolLM2-135M-Instruct), one run.

Prints, for each of our builds (fp32 and q4f16_1 by default): prefill of a PROMPT-token prompt
and greedy decode per token, next to transformers (fp32, eager, the GGUF loaded by transformers
itself) measured in the same process, and the ratios. Each figure is the median of REPEATS runs.

Usage: python benchmarks/cpu_versus.py [--work dist/cpu-versus] [--prompt 64] [--steps 64]
           [--quantizations q0f32,q4f16_1] [--cpu native] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def median_seconds(fn, repeats: int) -> float:  # noqa: ANN001
    """The median wall time of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_figures(gguf: Path, prompt: list[int], steps: int, repeats: int) -> dict:
    """transformers, eager, fp32: prefill seconds, decode ms per token (KV cache), generate."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        prefill = median_seconds(lambda: model(ids, use_cache=True), repeats)

        def decode() -> None:
            out = model(ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            per_token.append((time.perf_counter() - start) / steps)

        per_token: list[float] = []
        for _ in range(repeats):
            decode()
        generate = median_seconds(lambda: model.generate(
            ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False), repeats)
    return {"prefill_s": prefill, "decode_ms": 1e3 * statistics.median(per_token),
            "generate_s": generate, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def our_figures(model_dir: Path, lib: Path, prompt: list[int], steps: int,
                repeats: int) -> dict:
    """Our engine: prefill seconds (fresh cache each time), greedy decode ms per token."""
    from mistral_compile.runtime import Engine

    engine = Engine(model_dir, lib)

    def prefill() -> None:
        engine.reset()
        engine.prefill(prompt)

    prefill_s = median_seconds(prefill, repeats)
    per_token = []
    for _ in range(repeats):
        engine.reset()
        first = int(np.argmax(engine.prefill(prompt)))
        tokens = engine.greedy(first)
        start = time.perf_counter()
        for _ in range(steps):
            next(tokens)
        per_token.append((time.perf_counter() - start) / steps)
    generate = median_seconds(lambda: engine.generate(prompt, steps), repeats)
    return {"prefill_s": prefill_s, "decode_ms": 1e3 * statistics.median(per_token),
            "generate_s": generate, "threads": int(os.environ.get("TVM_NUM_THREADS", 0))}


def build(work: Path, gguf: Path, quantization: str, cpu: str) -> tuple[Path, Path]:
    """Convert and compile SmolLM2 into ``work`` where not done yet: (model dir, library)."""
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.weights import convert_weight

    model, lib = work / quantization, work / f"{quantization}-{cpu}.so"
    if not (model / "mistral-weights.json").is_file():
        convert_weight(gguf, model, quantization, progress=False)
    if not lib.is_file():
        compile_model(model, lib, device="cpu", cpu=cpu)
    return model, lib


def main() -> None:
    """Build what is missing, measure both, print the ratios."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="dist/cpu-versus")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quantizations", default="q0f32,q4f16_1")
    parser.add_argument("--cpu", default="native")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from mistral_compile.compiler.devices import resolve_cpu
    from mistral_compile.demo import smollm2_gguf

    gguf, work = smollm2_gguf(), Path(args.work)
    cpu = resolve_cpu(args.cpu)
    prompt = np.random.default_rng(0).integers(3, 49152, args.prompt).tolist()
    builds = {q: build(work, gguf, q, cpu) for q in args.quantizations.split(",")}
    ours = {q: our_figures(*paths, prompt, args.steps, args.repeats)
            for q, paths in builds.items()}
    hf = hf_figures(gguf, prompt, args.steps, args.repeats)
    print(f"SmolLM2-135M-Instruct on {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores; ours built for {cpu}; transformers "
          f"{hf['transformers']} (torch {hf['torch']}, {hf['threads']} threads, fp32 eager)")
    print(f"transformers: prefill {args.prompt} tokens {hf['prefill_s'] * 1e3:.1f} ms, decode "
          f"{hf['decode_ms']:.1f} ms/token ({1e3 / hf['decode_ms']:.1f} tok/s), generate "
          f"{args.steps} tokens {hf['generate_s']:.2f} s")
    for q, r in ours.items():
        print(f"ours {q:8s}: prefill {args.prompt} tokens {r['prefill_s'] * 1e3:.1f} ms "
              f"({hf['prefill_s'] / r['prefill_s']:.2f}x transformers), decode "
              f"{r['decode_ms']:.1f} ms/token ({1e3 / r['decode_ms']:.1f} tok/s, "
              f"{hf['decode_ms'] / r['decode_ms']:.2f}x transformers), generate "
              f"{args.steps} tokens {r['generate_s']:.2f} s "
              f"({hf['generate_s'] / r['generate_s']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "prompt": args.prompt,
                                               "steps": args.steps, "transformers": hf,
                                               "ours": ours}, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
