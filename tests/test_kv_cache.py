"""The page bookkeeping (runtime/kv_cache.py) and the scheduler (runtime/scheduler.py) alone."""

import pytest

from mistral_compile.abi import PAGE_SIZE, kv_groups, ring_width
from mistral_compile.runtime.kv_cache import KVCacheManager, PagePool, prefix_keys
from mistral_compile.runtime.sampling import SamplingParams
from mistral_compile.runtime.scheduler import Scheduler

W, CHUNK = 40, 16


def manager(windows, pages, caching=True, context=512):
    return KVCacheManager(kv_groups(windows), pages, CHUNK, context, caching)


def grow(kv, seq, tokens, count):
    """Reserve and advance ``count`` tokens, as a step does."""
    assert kv.reserve(seq, count)
    kv.advance(seq, tokens, count)


def test_pool_reuses_freed_then_cached_pages_least_recent_first():
    pool = PagePool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert pool.allocate() is None and pool.available == 0
    pool.register(a, b"a")
    pool.register(b, b"b")
    pool.drop(a)
    pool.drop(b)
    pool.drop(c)  # unregistered: free at once
    assert pool.available == 3 and pool.in_use == 0
    assert pool.allocate() == c  # free pages before cached ones
    assert pool.allocate() == a  # then the least recently used cached page, unregistered
    assert b"a" not in pool.page_of and b"b" in pool.page_of
    pool.hold(b)  # a cached page taken again leaves the LRU list
    assert pool.allocate() is None


def test_windowed_pages_are_freed_and_the_ring_never_collides():
    kv = manager([W, W], [64])
    seq, tokens = kv.new_sequence(), list(range(1000))
    width = ring_width(W, CHUNK, 512)
    for step in range(60):
        grow(kv, seq, tokens, CHUNK if step % 3 else 1)
        held = seq.held[0]
        assert len(held) <= width  # O(W + chunk) pages at any length
        assert len({lp % width for lp in held}) == len(held)  # distinct ring slots
        first = max(0, seq.length - W + 1) // PAGE_SIZE
        assert min(held) == first  # everything the next query reads, nothing before it


def test_a_failed_reservation_takes_nothing():
    kv = manager([0], [3], caching=False)
    seq = kv.new_sequence()
    grow(kv, seq, list(range(100)), 2 * PAGE_SIZE)
    before = dict(seq.held[0])
    assert not kv.reserve(seq, 2 * PAGE_SIZE)  # needs 2 fresh pages, 1 is left
    assert seq.held[0] == before and kv.pools[0].available == 1


def test_prefix_match_without_a_window_takes_every_full_page_but_the_last_token():
    kv = manager([0], [32])
    tokens = list(range(3 * PAGE_SIZE + 5))
    a = kv.new_sequence()
    grow(kv, a, tokens, len(tokens))
    b = kv.new_sequence()
    assert kv.match_prefix(b, tokens) == 3 * PAGE_SIZE
    assert all(kv.pools[0].refs[p] == 2 for p in b.held[0].values())
    c = kv.new_sequence()  # a prompt of exactly the cached pages: the last one is recomputed
    assert kv.match_prefix(c, tokens[:3 * PAGE_SIZE]) == 2 * PAGE_SIZE
    d = kv.new_sequence()  # a different token in page 1: only page 0 is the same prefix
    other = tokens[:PAGE_SIZE + 3] + [999] + tokens[PAGE_SIZE + 4:]
    assert kv.match_prefix(d, other) == PAGE_SIZE


def test_prefix_match_with_a_window_needs_only_the_window_before_it():
    kv = manager([W], [64])
    tokens = list(range(10 * PAGE_SIZE + 1))
    a = kv.new_sequence()
    for _ in range(10):
        grow(kv, a, tokens, PAGE_SIZE)  # the early pages were freed but stay cached
    kv.release(a)
    # evict the first pages from the cache: a prefix whose window is still cached is usable
    keys = prefix_keys(tokens, 10)
    for key in keys[:3]:
        page = kv.pools[0].page_of[key]
        kv.pools[0].unused.pop(page)
        del kv.pools[0].page_of[key], kv.pools[0].key_of[page]
        kv.pools[0].free.append(page)
    b = kv.new_sequence()
    assert kv.match_prefix(b, tokens) == 10 * PAGE_SIZE
    first = (10 * PAGE_SIZE - W + 1) // PAGE_SIZE
    assert sorted(b.held[0]) == list(range(first, 10))
    c = kv.new_sequence()
    keys_needed = range((4 * PAGE_SIZE - W + 1) // PAGE_SIZE, 4)  # its window reaches page 1
    assert min(keys_needed) < 3
    assert kv.match_prefix(c, tokens[:4 * PAGE_SIZE + 1]) == 0  # page 1 was evicted


def test_mixed_groups_keep_full_pages_and_free_windowed_ones():
    kv = manager([W, 0, W, 0], [16, 64])
    seq, tokens = kv.new_sequence(), list(range(400))
    for _ in range(20):
        grow(kv, seq, tokens, CHUNK)
    assert len(seq.held[1]) == 320 // PAGE_SIZE  # full layers: every page
    assert len(seq.held[0]) <= ring_width(W, CHUNK, 512)  # windowed: the ring


def scheduler(pages, batch=4, chunk=CHUNK, budget=None):
    kv = manager([0], [pages], caching=False)
    return Scheduler(kv, batch, chunk, budget), kv


def run_step(sched, work, next_token=7):
    sched.completed(work)
    for w in work:
        if w.samples:
            w.seq.tokens.append(next_token)


def test_decode_rows_go_first_and_prompts_are_chunked_within_the_budget():
    sched, _ = scheduler(64, budget=20)
    a = sched.add("a", list(range(50)), SamplingParams())
    work = sched.schedule()
    assert [(w.seq.request_id, w.count) for w in work] == [("a", 16)]
    run_step(sched, work)
    sched.add("b", list(range(5)), SamplingParams())
    for _ in range(3):
        run_step(sched, sched.schedule())
    assert a.pending == 1  # a's prompt is read: one token pending
    work = sched.schedule()
    assert work[0].seq is a and work[0].count == 1  # the decode row first
    assert sum(w.count for w in work) <= 20


def test_the_newest_running_sequence_is_preempted_and_waits_in_arrival_order():
    sched, kv = scheduler(6, chunk=2 * PAGE_SIZE, budget=100)
    seqs = [sched.add(i, list(range(2 * PAGE_SIZE)), SamplingParams()) for i in range(3)]
    run_step(sched, sched.schedule())  # all three admitted, two full pages each
    assert all(s.status == "running" for s in seqs) and kv.pools[0].available == 0
    run_step(sched, sched.schedule())  # every one needs a third page: the newest gives way
    assert seqs[2].status == "waiting" and seqs[2].preemptions == 1
    assert seqs[2].pages.length == 0 and not seqs[2].pages.held[0]
    assert sched.waiting == [seqs[2]]
    sched.finish(seqs[0], "stop")
    work = sched.schedule()
    assert seqs[2] in [w.seq for w in work]  # recomputed from its tokens
    assert next(w for w in work if w.seq is seqs[2]).start == 0


def test_a_sequence_alone_that_outgrows_the_cache_ends_instead_of_looping():
    sched, kv = scheduler(2, chunk=PAGE_SIZE)
    seq = sched.add(0, list(range(2 * PAGE_SIZE - 3)), SamplingParams())
    for _ in range(10):
        run_step(sched, sched.schedule())
        if seq.status == "finished":
            break
    assert (seq.status, seq.finish_reason) == ("finished", "length")
    assert sched.ended == [seq] and kv.pools[0].in_use == 0 and not sched.has_work()


@pytest.mark.parametrize("windows", [[0], [W], [W, 0]])
def test_release_returns_every_page(windows):
    kv = manager(windows, [64] * len(set(windows)))
    seq, tokens = kv.new_sequence(), list(range(300))
    for _ in range(12):
        grow(kv, seq, tokens, CHUNK)
    kv.release(seq)
    assert all(pool.in_use == 0 for pool in kv.pools)
