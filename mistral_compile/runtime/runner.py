"""The model runner: one step of a batch on the device (the step's arrays up, ``batch_step``)."""

from __future__ import annotations

import numpy as np
import tvm

from mistral_compile.abi import PAGE_SIZE
from mistral_compile.runtime.artifact import Artifact
from mistral_compile.runtime.kv_cache import KVCacheManager
from mistral_compile.runtime.scheduler import Work


def page_bytes(artifact: Artifact, layers: int) -> int:
    """Bytes of one page of a group of ``layers`` layers."""
    cfg = artifact.config
    itemsize = tvm.runtime.DataType(artifact.dtype).bits // 8
    return layers * 2 * cfg.num_key_value_heads * PAGE_SIZE * cfg.head_dim * itemsize


class ModelRunner:
    """Owns the page pools on the device and runs ``batch_step`` for a list of Work."""

    def __init__(self, artifact: Artifact, kv: KVCacheManager) -> None:
        self.artifact, self.kv = artifact, kv
        cfg = artifact.config
        self.fn = artifact.vm["batch_step"]
        # not zeroed: a slot is always written (append) before any query reads it
        self.pools = [tvm.runtime.empty((pool.num_pages, len(group.layers), 2,
                                         cfg.num_key_value_heads, PAGE_SIZE, cfg.head_dim),
                                        artifact.dtype, artifact.device)
                      for pool, group in zip(kv.pools, kv.groups, strict=True)]
        self._pools = tvm.runtime.convert(self.pools)
        self.pool_bytes = sum(p.numel() * p.dtype.itemsize for p in self.pools)

    def _up(self, array: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.ascontiguousarray(array), self.artifact.device)

    def run(self, work: list[Work]) -> tvm.runtime.Tensor:
        """Logits [len(work), vocab] float32 on the device: of each work's last token."""
        ids, positions, rows, last = [], [], [], []
        total = 0
        for row, w in enumerate(work):
            ids.extend(w.seq.tokens[w.start:w.start + w.count])
            positions.append(np.arange(w.start, w.start + w.count, dtype="int32"))
            rows.append(np.full(w.count, row, dtype="int32"))
            total += w.count
            last.append(total - 1)
        seqs = [w.seq.pages for w in work]
        tables = []
        for g, group in enumerate(self.kv.groups):
            width = self.kv.widths[g]
            if group.window <= 0:  # only as wide as this step's longest sequence needs
                width = max((max(s.held[g]) + 1 for s in seqs if s.held[g]), default=1)
            tables.append(self._up(self.kv.table(g, seqs, width)))
        return self.fn(self._up(np.asarray(ids, dtype="int32")),
                       self._up(np.concatenate(positions)), self._up(np.concatenate(rows)),
                       self._up(np.asarray(last, dtype="int32")),
                       tvm.runtime.convert(tables), self._pools, self.artifact.params)
