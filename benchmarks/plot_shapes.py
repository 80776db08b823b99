"""Plot batch-1 decode of every shape as a share of the copy bandwidth (scripts/gpu/shapes.sh).

Usage: python benchmarks/plot_shapes.py OUT.png SHAPE.json [SHAPE.json ...]
Each JSON is a ``bench --json`` of one shape; its name after "shape-" labels the bars. The
targets of issue 20 are drawn as lines: 90% at 1k, 85% at 4k. At 32k the bar counts the KV cache
read per step with the weights.
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
        # at 32k the cache is a large share of the bytes: weights + the KV held, read per step
        longest = max(doc["decode"], key=lambda r: r["context"])
        kv = doc["kv_cache_bytes_per_token"] * longest["cache_tokens_held"]
        moved = (doc["weight_bytes_read_per_token"] + kv) / (longest["ms_per_token"] / 1e3)
        long_share = moved / (doc["copy_bandwidth_GBps"] * 1e9) if longest["context"] > 4096 \
            else None
        rows.append((label, share.get(1024), share.get(4096), long_share))
    fig, ax = plt.subplots(figsize=(9, 4.6))
    xs = range(len(rows))
    for i, (offset, name) in enumerate(((-0.27, "context 1k"), (0, "context 4k"),
                                        (0.27, "context 32k (weights + KV)"))):
        ax.bar([x + offset for x in xs], [100 * (r[1 + i] or 0) for r in rows], 0.27,
               label=name)
    ax.axhline(90, color="C0", linestyle="--", linewidth=1, label="target at 1k (90%)")
    ax.axhline(85, color="C1", linestyle=":", linewidth=1, label="target at 4k (85%)")
    ax.set_xticks(list(xs), [r[0] for r in rows], rotation=20)
    ax.set_ylabel("bytes read per step / copy bandwidth (%)")
    ax.set_ylim(0, 100)
    ax.set_title("mistral-compile batch-1 decode on the H200, every configs/ shape")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
