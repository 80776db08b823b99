"""Plot batch-1 decode of every shape as a share of the copy bandwidth (scripts/gpu/shapes.sh).

Usage: python benchmarks/plot_shapes.py OUT.png SHAPE.json [SHAPE.json ...]
Each JSON is a ``bench --json`` of one shape; its name after "shape-" labels the bars. The
targets of issue 20 are drawn as lines: 90% at 1k, 85% at 4k.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    """Draw the bars."""
    out, paths = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    rows = []
    for path in paths:
        doc = json.loads(path.read_text())
        label = path.stem.split("shape-", 1)[-1]
        share = {r["context"]: r["MBU"] for r in doc["decode"]}
        rows.append((label, share.get(1024), share.get(4096)))
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * (r[1] or 0) for r in rows], 0.4, label="context 1k")
    ax.bar([x + 0.2 for x in xs], [100 * (r[2] or 0) for r in rows], 0.4, label="context 4k")
    ax.axhline(90, color="C0", linestyle="--", linewidth=1, label="target at 1k (90%)")
    ax.axhline(85, color="C1", linestyle=":", linewidth=1, label="target at 4k (85%)")
    ax.set_xticks(list(xs), [r[0] for r in rows], rotation=20)
    ax.set_ylabel("weights read / copy bandwidth (%)")
    ax.set_ylim(0, 100)
    ax.set_title("mistral-compile batch-1 decode on the H200, every configs/ shape")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
