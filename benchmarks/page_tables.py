"""Host time of a decode step's arrays (ids, positions, page tables): kept rows against a walk.

Usage: python benchmarks/page_tables.py [--batch 64] [--context 1024]
Builds a KV manager with ``batch`` sequences of ``context`` tokens (one full-attention group, as
the 7B shape with windows off) and times ``ModelRunner.arrays`` for a decode step, against the
same tables built by walking every held page (what the runner did before session 13), in the
same run.
"""

from __future__ import annotations

import argparse
import time
import types

import numpy as np

from mistral_compile.abi import KVGroup
from mistral_compile.runtime.kv_cache import KVCacheManager
from mistral_compile.runtime.runner import ModelRunner


def walked(kv: KVCacheManager, g: int, seqs: list, width: int) -> np.ndarray:
    """The table as the runner built it before: every held page of every row, one by one."""
    out = np.zeros((len(seqs), width), dtype="int32")
    for row, seq in enumerate(seqs):
        for lp, page in seq.held[g].items():
            out[row, lp % width] = page
    return out


def main() -> None:
    """Print both timings and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    kv = KVCacheManager([KVGroup(0, tuple(range(32)))], [args.batch * (args.context // 16 + 8)],
                        2048, 32768)
    work = []
    for i in range(args.batch):
        seq = kv.new_sequence()
        tokens = np.random.default_rng(i).integers(3, 30000, args.context + 1).tolist()
        assert kv.reserve(seq, args.context)
        kv.advance(seq, tokens, args.context)
        assert kv.reserve(seq, 1)
        work.append(types.SimpleNamespace(seq=types.SimpleNamespace(tokens=tokens, pages=seq),
                                          start=args.context, count=1))
    runner = ModelRunner.__new__(ModelRunner)  # the host side only: no library, no device
    runner.kv, runner.row_buckets, runner.scratch = kv, [args.batch], [kv.pools[0].num_pages]
    _, tables = runner.arrays(work)
    seqs = [w.seq.pages for w in work]
    assert (walked(kv, 0, seqs, tables[0].shape[1]) == tables[0]).all()
    results = {}
    for name, fn in (("arrays (kept rows)", lambda: runner.arrays(work)),
                     ("tables by walking the held pages", lambda: walked(
                         kv, 0, seqs, tables[0].shape[1]))):
        fn()
        start = time.perf_counter()
        for _ in range(200):
            fn()
        results[name] = (time.perf_counter() - start) / 200
        print(f"{name}: {results[name] * 1e3:.3f} ms (batch {args.batch}, context "
              f"{args.context})")
    print(f"whole arrays with kept rows / the walk's tables alone: "
          f"{results['arrays (kept rows)'] / results['tables by walking the held pages']:.2f}")


if __name__ == "__main__":
    main()
