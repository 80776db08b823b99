"""The model runner: one step of a batch on the device (the step's arrays up, ``batch_step``).

Decode steps (one token per row) on CUDA are replayed from CUDA graphs (runtime/cuda_graph.py).
So that a few graphs serve every batch, such a step is padded: its rows to the next size in
``ROW_BUCKETS`` and the tables of full-attention groups to a power of two of pages. A padding
row computes token 0 at position 0 on a scratch page of its own (one page past the pages the
KV manager hands out), so it touches no sequence's KV; its logits are dropped.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm

from mistral_compile.abi import PAGE_SIZE, SINK_COLUMNS
from mistral_compile.runtime.artifact import Artifact
from mistral_compile.runtime.kv_cache import KVCacheManager
from mistral_compile.runtime.scheduler import Work

logger = logging.getLogger("mistral_compile.runtime")

# rows of a padded decode step: every size up to 8, then steps of 8 to 64, then of 32
ROW_BUCKETS = [1, 2, 3, 4, 5, 6, 7, 8] + list(range(16, 65, 8)) + list(range(96, 1025, 32))


def page_bytes(artifact: Artifact, layers: int) -> int:
    """Bytes of one page of a group of ``layers`` layers."""
    cfg = artifact.config
    itemsize = tvm.runtime.DataType(artifact.dtype).bits // 8
    return layers * 2 * shard_kv_heads(artifact) * PAGE_SIZE * cfg.head_dim * itemsize


def shard_kv_heads(artifact: Artifact) -> int:
    """The KV heads this process's pages hold: its shard's (model/parallel.py), or all."""
    cfg = artifact.config
    return cfg.num_key_value_heads // cfg.tensor_parallel_shards


def padded_rows(rows: int, buckets: list[int] = ROW_BUCKETS) -> int:
    """The row bucket a decode step of ``rows`` rows runs as."""
    return next((b for b in buckets if b >= rows), rows)


class ModelRunner:
    """Owns the page pools on the device and runs ``batch_step`` for a list of Work.

    ``pad_decode`` pads decode steps as the CUDA graphs do (on by default with them; tests
    turn it on for the CPU); ``cuda_graphs`` False runs every step eagerly.
    """

    def __init__(self, artifact: Artifact, kv: KVCacheManager, max_rows: int = 256,
                 cuda_graphs: bool = True) -> None:
        self.artifact, self.kv = artifact, kv
        cfg = artifact.config
        self.fn = artifact.vm["batch_step"]
        # not zeroed: a slot is always written (append) before any query reads it. One page
        # more than the manager's: the scratch page of padding rows.
        self.scratch = [pool.num_pages for pool in kv.pools]
        self.pools = [tvm.runtime.empty((pool.num_pages + 1, len(group.layers), 2,
                                         shard_kv_heads(artifact), PAGE_SIZE, cfg.head_dim),
                                        artifact.dtype, artifact.device)
                      for pool, group in zip(kv.pools, kv.groups, strict=True)]
        self._pools = tvm.runtime.convert(self.pools)
        self.pool_bytes = sum(p.numel() * p.dtype.itemsize for p in self.pools)
        self.graphs = None
        self.row_buckets = ROW_BUCKETS
        # a sharded step's all-reduce is a host call: a graph cannot capture it
        if cuda_graphs and artifact.kind == "cuda" and artifact.config.tensor_parallel_shards == 1:
            from mistral_compile.runtime.cuda_graph import GraphedStep

            self.graphs = GraphedStep(self.fn, artifact.device, padded_rows(max_rows),
                                      list(kv.widths))
        self.pad_decode = self.graphs is not None
        # a tensor-parallel driver's: sends each step's arrays to the other shards first
        self.mirror = None

    def _up(self, array: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.ascontiguousarray(array), self.artifact.device)

    def _widths(self, work: list[Work], pad: bool) -> list[int]:
        """Each group's table width.

        A window group's is its ring; a full group's is what this step's longest sequence needs
        (padded: the next power of two, at most the ring).
        """
        widths = []
        for g, group in enumerate(self.kv.groups):
            width = self.kv.widths[g]
            if group.window <= 0:
                need = max([1] + [w.seq.pages.top[g] for w in work])
                width = min(width, 1 << (need - 1).bit_length()) if pad else need
            widths.append(width)
        return widths

    def arrays(self, work: list[Work], pad: bool = False) -> tuple[list[np.ndarray],
                                                                   list[np.ndarray]]:
        """The step's (ids, positions, rows, logit index, sinks) and its page tables, as numpy.

        With ``pad`` (decode steps only) the rows are padded to their bucket.
        """
        ids, positions, rows, last, sinks = [], [], [], [], []
        total = 0
        for row, w in enumerate(work):
            ids.extend(w.seq.tokens[w.start:w.start + w.count])
            positions.extend(range(w.start, w.start + w.count))
            rows.extend([row] * w.count)
            total += w.count
            last.append(total - 1)
            sinks.append(self.kv.sink_row(w.seq.pages, w.start))
        widths = self._widths(work, pad)
        seqs = [w.seq.pages for w in work]
        tables = [self.kv.table(g, seqs, width) for g, width in enumerate(widths)]
        if pad:
            extra = padded_rows(len(work), self.row_buckets) - len(work)
            first = len(work)
            ids += [0] * extra
            positions += [0] * extra
            rows += range(first, first + extra)
            last += range(total, total + extra)
            sinks += [(0, 0, 0)] * extra
            tables = [np.concatenate([t, np.full((extra, t.shape[1]), self.scratch[g], "int32")])
                      for g, t in enumerate(tables)]
        # without sinks one zero column: the CUDA step then runs the kernel without them
        sinks = np.asarray(sinks, dtype="int32").reshape(-1, SINK_COLUMNS)
        return ([np.asarray(a, dtype="int32") for a in (ids, positions, rows, last)]
                + [sinks if self.kv.sink else sinks[:, :1]], tables)

    def execute(self, arrays: list[np.ndarray], tables: list[np.ndarray]) -> tvm.runtime.Tensor:
        """``batch_step`` on a step's host arrays (``arrays``), eagerly: the logits."""
        return self.fn(*(self._up(a) for a in arrays),
                       tvm.runtime.convert([self._up(t) for t in tables]), self._pools,
                       self.artifact.params)

    def run(self, work: list[Work]) -> tvm.runtime.Tensor:
        """Logits [len(work), vocab] float32 on the device: of each work's last token."""
        decode = all(w.count == 1 for w in work)
        arrays, tables = self.arrays(work, pad=decode and self.pad_decode)
        vocab = self.artifact.config.vocab_size
        if decode and self.graphs is not None and self.graphs.fits(
                len(arrays[0]), [t.shape[1] for t in tables]):
            try:
                logits = self.graphs.run(arrays, tables, self._pools, self.artifact.params)
                return logits._create_view((len(work), vocab))
            except Exception as err:  # noqa: BLE001 - any capture failure: run eagerly, correct
                logger.warning("CUDA graph capture failed (%s): decode steps run eagerly",
                               str(err).splitlines()[-1] if str(err) else type(err).__name__)
                self.graphs, self.pad_decode = None, False
        if self.mirror is not None:  # every shard runs the step (they meet in all-reduces)
            self.mirror(arrays, tables)
        logits = self.execute(arrays, tables)
        padded = len(arrays[3]) != len(work)  # logits of padding rows follow the real ones
        return logits._create_view((len(work), vocab)) if padded else logits
