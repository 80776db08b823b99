"""Plot decode latency against context length, with and without the window (matplotlib).

Usage: python benchmarks/plot_decode.py BENCH_WINDOW.json BENCH_FULL.json OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    """Draw the two curves."""
    window, full, out = (Path(a) for a in sys.argv[1:4])
    fig, ax = plt.subplots(figsize=(6, 4))
    for path, label in ((window, "sliding window 4096"), (full, "full attention")):
        rows = json.loads(path.read_text())["decode"]
        ax.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows], marker="o",
                label=label)
    meta = json.loads(window.read_text())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode latency (ms/token, batch 1)")
    ax.set_title(f"mistral-compile, Mistral-7B shape, {meta['dtype']}, {meta['device']}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
