"""Page bookkeeping of the paged KV cache: pools, sequences' pages, prefix sharing, freeing.

The device side is model/kv_paged.py (pools and tables as arrays); every decision is made here.
Each window group has its own pool, so the pages of windowed layers are freed as the window
passes them while full layers keep theirs (Ministral's 1 full : 3 windowed layers).

A full page is registered under the hash of every token up to its end (a chain, as vLLM's
prefix cache): a later sequence with the same prefix takes the page instead of computing it.
Pages are reference counted; a registered page nobody holds stays cached until a fresh page is
needed, oldest first (LRU). KV at a position depends only on the tokens up to it, so sharing
is exact; with a window a prefix is reusable while the pages the next query reads are there.

StreamingLLM sinks (``sink`` > 0, one windowed group): a sequence keeps the page of its first
PAGE_SIZE positions when the window passes it (``SequencePages.sink_page``), and each step's
row tells the kernels the sink count, that page and the shift (``sink_row``). The KV of later
positions then depends on the chunking, so the engine turns prefix caching off.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from mistral_compile.abi import PAGE_SIZE, KVGroup, ring_width


class PagePool:
    """One group's pages: free list, reference counts, and the prefix cache over them."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.free = list(range(num_pages - 1, -1, -1))  # pop() gives page 0 first
        self.refs = [0] * num_pages
        self.key_of: dict[int, bytes] = {}  # registered page -> its prefix hash
        self.page_of: dict[bytes, int] = {}
        self.unused: OrderedDict[int, None] = OrderedDict()  # registered, refs 0: LRU order

    def allocate(self) -> int | None:
        """A page with one reference: a free one, else the least recently used cached one."""
        if self.free:
            page = self.free.pop()
        elif self.unused:
            page, _ = self.unused.popitem(last=False)
            del self.page_of[self.key_of.pop(page)]
        else:
            return None
        self.refs[page] = 1
        return page

    def hold(self, page: int) -> None:
        """One more reference (a cached page leaves the LRU list)."""
        if self.refs[page] == 0:
            self.unused.pop(page, None)
        self.refs[page] += 1

    def drop(self, page: int) -> None:
        """One reference less; at zero a registered page is cached, another one freed."""
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self.key_of:
                self.unused[page] = None
            else:
                self.free.append(page)

    def register(self, page: int, key: bytes) -> None:
        """Make a full page findable by its prefix hash (the first page with a key wins)."""
        if key not in self.page_of and page not in self.key_of:
            self.page_of[key] = page
            self.key_of[page] = key

    @property
    def available(self) -> int:
        """Pages that can be handed out now (free or cached and unreferenced)."""
        return len(self.free) + len(self.unused)

    @property
    def in_use(self) -> int:
        """Pages some sequence holds."""
        return self.num_pages - self.available


@dataclass
class SequencePages:
    """A sequence's pages per group (logical page -> physical page) and its KV length.

    ``rows[g]`` is the sequence's page-table row of group g, kept as pages are taken (a step's
    table is then a stack of rows, not a walk over every held page); ``top[g]`` is one past
    the highest logical page held.
    """

    held: list[dict[int, int]]
    rows: list[np.ndarray]
    top: list[int]
    length: int = 0  # tokens whose KV is in the pages
    keys: list[bytes] = field(default_factory=list)  # prefix hash of each full page so far
    sink_page: int | None = None  # with sinks: logical page 0, kept once the window passed it

    def hold(self, g: int, lp: int, page: int) -> None:
        """Logical page ``lp`` of group g is physical ``page``: the held map and the row."""
        self.held[g][lp] = page
        row = self.rows[g]
        row[lp % len(row)] = page
        self.top[g] = max(self.top[g], lp + 1)


def prefix_keys(tokens: list[int], pages: int, known: list[bytes] | None = None) -> list[bytes]:
    """The chain hashes of the first ``pages`` full pages of ``tokens`` (extends ``known``)."""
    keys = list(known or [])
    for i in range(len(keys), pages):
        chunk = np.asarray(tokens[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], dtype="<i4").tobytes()
        keys.append(hashlib.blake2b((keys[-1] if keys else b"") + chunk,
                                    digest_size=16).digest())
    return keys


class KVCacheManager:
    """The pages of every sequence across the window groups' pools."""

    def __init__(self, groups: list[KVGroup], pages: list[int], chunk: int, context: int,
                 prefix_caching: bool = True, sink: int = 0) -> None:
        self.groups, self.sink = groups, sink
        self.pools = [PagePool(n) for n in pages]
        self.widths = [ring_width(g.window, chunk, context) for g in groups]
        self.prefix_caching = prefix_caching
        self.hit_tokens = 0  # prompt tokens taken from the prefix cache
        self.queried_tokens = 0

    def new_sequence(self) -> SequencePages:
        return SequencePages([{} for _ in self.groups],
                             [np.zeros(w, dtype="int32") for w in self.widths],
                             [0] * len(self.groups))

    def _needed(self, g: int, start: int, end: int) -> range:
        """Logical pages of group g that a step over positions [start, end) reads or writes."""
        window = self.groups[g].window
        first = max(0, start - window + 1) if window > 0 else 0
        return range(first // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1)

    def match_prefix(self, seq: SequencePages, tokens: list[int]) -> int:
        """Take the cached pages of the longest usable prefix of ``tokens``; its length.

        At least one token is left to compute (its logits are needed). A prefix of k pages is
        usable when every group holds what the query at position k * PAGE_SIZE reads: all pages
        before it without a window, the pages its window reaches with one.
        """
        assert seq.length == 0 and not any(seq.held)
        self.queried_tokens += len(tokens)
        if not self.prefix_caching:
            return 0
        most = (len(tokens) - 1) // PAGE_SIZE
        keys = prefix_keys(tokens, most)
        for k in range(most, 0, -1):
            length = k * PAGE_SIZE
            found = []
            for g, pool in enumerate(self.pools):
                window = self.groups[g].window
                first = max(0, length - window + 1) // PAGE_SIZE if window > 0 else 0
                pages = [pool.page_of.get(keys[i]) for i in range(first, k)]
                if any(p is None for p in pages):
                    break
                found.append(dict(zip(range(first, k), pages, strict=True)))
            else:
                for g, held in enumerate(found):
                    for lp, page in held.items():
                        self.pools[g].hold(page)
                        seq.hold(g, lp, page)
                seq.length, seq.keys = length, keys[:k]
                self.hit_tokens += length
                return length
        return 0

    def reserve(self, seq: SequencePages, count: int) -> bool:
        """Pages for ``count`` more tokens; False (nothing taken) when a pool runs out."""
        taken: list[tuple[int, int, int]] = []
        for g, pool in enumerate(self.pools):
            for lp in self._needed(g, seq.length, seq.length + count):
                if lp in seq.held[g]:
                    continue
                page = pool.allocate()
                if page is None:
                    for tg, tlp, tpage in taken:
                        del seq.held[tg][tlp]
                        self.pools[tg].drop(tpage)
                        seq.top[tg] = max(seq.held[tg], default=-1) + 1
                    return False
                seq.hold(g, lp, page)
                taken.append((g, lp, page))
        return True

    def advance(self, seq: SequencePages, tokens: list[int], count: int) -> None:
        """``count`` tokens were computed: register the pages they filled, free passed ones.

        ``tokens`` is the sequence's tokens (at least ``seq.length + count`` of them).
        """
        seq.length += count
        full = seq.length // PAGE_SIZE
        if self.prefix_caching and full > len(seq.keys):
            first = len(seq.keys)
            seq.keys = prefix_keys(tokens, full, seq.keys)
            for g, pool in enumerate(self.pools):
                for lp in range(first, full):
                    if lp in seq.held[g]:
                        pool.register(seq.held[g][lp], seq.keys[lp])
        for g, group in enumerate(self.groups):
            if group.window <= 0:
                continue
            first = max(0, seq.length - group.window + 1) // PAGE_SIZE
            for lp in [lp for lp in seq.held[g] if lp < first]:
                page = seq.held[g].pop(lp)
                if lp == 0 and self.sink:
                    seq.sink_page = page  # the sinks stay while the sequence lives
                else:
                    self.pools[g].drop(page)

    def release(self, seq: SequencePages) -> None:
        """Drop every page of the sequence (finished, cancelled or preempted)."""
        for g, held in enumerate(seq.held):
            for page in held.values():
                self.pools[g].drop(page)
            held.clear()
            seq.rows[g][:] = 0
            seq.top[g] = 0
        if seq.sink_page is not None:
            self.pools[0].drop(seq.sink_page)
        seq.length, seq.keys, seq.sink_page = 0, [], None

    def sink_row(self, seq: SequencePages, start: int) -> tuple[int, int, int]:
        """(sink count, the sinks' page, shift) of a step whose chunk starts at ``start``.

        (0, 0, 0) without sinks. The shift is the float64 reference's: max(0, start - (W - 1)).
        """
        if not self.sink:
            return 0, 0, 0
        page = seq.sink_page if seq.sink_page is not None else seq.held[0][0]
        return self.sink, page, max(0, start - (self.groups[0].window - 1))

    def table(self, g: int, seqs: list[SequencePages], width: int) -> np.ndarray:
        """Group g's page table for a step's rows: [rows, width] int32.

        ``width`` is the group's ring, or (no window) at least ``top``: either way a held page
        sits at its logical page modulo the width, as in the kept rows.
        """
        if not seqs:
            return np.zeros((0, width), dtype="int32")
        return np.stack([seq.rows[g][:width] for seq in seqs])

    def stats(self) -> dict[str, int]:
        """Pages in use and total per group, and the prefix cache's hits (in tokens)."""
        out = {"prefix_hit_tokens": self.hit_tokens, "prefix_queried_tokens": self.queried_tokens}
        for g, pool in enumerate(self.pools):
            out[f"group{g}_pages_in_use"] = pool.in_use
            out[f"group{g}_pages"] = pool.num_pages
        return out
