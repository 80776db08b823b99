"""Print ours against the Hugging Face peer, from JSON files written in the same device call.

The files come from `mistral-compile bench --json` and `benchmarks/hf_baseline.py --json`.

Usage: python benchmarks/versus.py OURS.json HF.json [OURS_Q4.json ...]
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    """One line per context: ours, the peer's torch.compile and eager figures, the ratios."""
    ours_files, hf_file = [sys.argv[1], *sys.argv[3:]], sys.argv[2]
    hf = json.load(open(hf_file))
    peer = {(r["method"], r["context"]): r["ms_per_token"] for r in hf["rows"]}
    print(f"peer: transformers {hf['transformers']}, torch {hf['torch']}, {hf['gpu']}")
    for path in ours_files:
        ours = json.load(open(path))
        label = f"{ours.get('quantization') or ours['dtype']}, window {ours['window']}" + (
            ", CUDA graph" if ours.get("cuda_graph") else "") + (
            f", {ours['kv_cache']} KV cache" if ours.get("kv_cache") else "")
        for row in ours["decode"]:
            ctx = row["context"]
            compiled = peer.get(("StaticCache + torch.compile", ctx))
            eager = peer.get(("eager, DynamicCache", ctx))
            line = f"decode at {ctx:5d} ({label}): ours {row['ms_per_token']:.2f} ms"
            if compiled:
                line += (f", torch.compile {compiled:.2f} ms -> "
                         f"{compiled / row['ms_per_token']:.2f}x")
            if eager:
                line += f", eager {eager:.2f} ms -> {eager / row['ms_per_token']:.2f}x"
            print(line)
        for row in ours.get("prefill", []):
            print(f"prefill {row['tokens']} tokens ({label}): ours {row['seconds'] * 1e3:.1f} ms"
                  f", {row['tokens_per_s']:.0f} tok/s, MFU {100 * row['MFU']:.1f}%")
    if "prefill_1024_ms" in hf:
        print(f"peer prefill 1024 tokens (eager): {hf['prefill_1024_ms']:.1f} ms")


if __name__ == "__main__":
    main()
