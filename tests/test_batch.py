"""The batched runtime (runtime/llm.py) against Hugging Face, one sequence at a time."""

from collections import defaultdict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_library  # noqa: E402
from reference import streaming_logits  # noqa: E402

from mistral_compile.abi import PAGE_SIZE  # noqa: E402
from mistral_compile.errors import MistralCompileError  # noqa: E402
from mistral_compile.runtime.llm import LLM, EngineConfig  # noqa: E402
from mistral_compile.runtime.sampling import SamplingParams  # noqa: E402

W = 16
TOL = 1e-4
MODELS = {
    "windowed": ("MistralForCausalLM", dict(sliding_window=W)),
    "full": ("MistralForCausalLM", dict(sliding_window=None)),
    "per_layer": ("MinistralForCausalLM",
                  dict(num_hidden_layers=3, head_dim=16, sliding_window=W,
                       layer_types=["sliding_attention", "full_attention",
                                    "sliding_attention"])),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    cls, cfg = MODELS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    return request.param, tiny_library(root, cls, **cfg), root


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("windowed_only")
    return tiny_library(root, sliding_window=W), root


def engine(root, model_dir=None, lib=None, device="cpu", **settings):
    """An LLM on ``root``'s model and library that records the logits it samples from."""
    llm = LLM(model_dir or root / "model", lib or root / "lib.so", device,
              engine_config=EngineConfig(**settings))
    seen = defaultdict(list)  # request id -> logits of each sampled position
    run = llm.runner.run

    def recording(work):
        out = run(work)
        host = out.numpy()
        for i, w in enumerate(work):
            if w.samples:
                seen[w.seq.request_id].append(host[i].copy())
        return out

    llm.runner.run = recording
    return llm, seen


def hf_logits(ref, tokens):
    with torch.no_grad():
        device = next(ref.parameters()).device
        return ref(torch.tensor([tokens], device=device)).logits[0].float().cpu().numpy()


def check_against_hf(ref, llm, seen, prompts, tol=TOL):
    """Every request's recorded logits equal HF's on its own tokens; greedy tokens equal."""
    worst = 0.0
    for rid, prompt in prompts.items():
        out = llm.outputs[rid]
        tokens = list(prompt) + out.token_ids
        want = hf_logits(ref, tokens)[len(prompt) - 1:len(tokens) - 1]
        got = np.stack(seen[rid])
        assert got.shape == want.shape
        for step, (token, row) in enumerate(zip(out.token_ids, want, strict=True)):
            # greedy: HF's argmax, or (fp16) a token HF scores within the tolerance of it
            assert row[token] >= row.max() - 2 * tol, (rid, step)
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= tol, worst
    return worst


def join_and_leave(llm):
    """Lengths 1 to past 4W added at steps 0/2/3/9, ending after different budgets; the prompts.

    Runs ``llm`` to the end and checks every request ran its whole budget.
    """
    rng = np.random.default_rng(0)
    lengths = [1, 7, W, W + 1, 2 * W + 3, 4 * W + 6, 3]
    budgets = [20, 5, 12, 30, 8, 10, 25]
    prompts = {}
    schedule = {0: [0, 1, 2], 2: [3], 3: [4, 5], 9: [6]}
    step = 0
    while step <= max(schedule) or llm.has_unfinished():
        for i in schedule.get(step, []):
            prompts[i] = rng.integers(3, 256, lengths[i]).tolist()
            llm.add_request(i, prompts[i], SamplingParams(max_tokens=budgets[i]))
        llm.step()
        step += 1
    assert all(len(llm.outputs[i].token_ids) == budgets[i] for i in prompts)
    assert all(llm.outputs[i].finish_reason == "length" for i in prompts)
    return prompts


def test_sequences_joining_and_leaving_equal_hf_alone(model):
    # chunks of 8 and at most 20 tokens a step: prompts are read in pieces between decode steps
    name, ref, root = model
    llm, seen = engine(root, max_batch_size=4, prefill_chunk_size=8, max_step_tokens=20)
    prompts = join_and_leave(llm)
    print(f"{name}: max |dlogit| {check_against_hf(ref, llm, seen, prompts):.2e}")
    assert llm.stats()["preemptions"] == 0
    for pool in llm.kv.pools:  # everything released (cached pages are unreferenced)
        assert pool.in_use == 0


SINKS = 4


def test_sinks_equal_the_float64_reference_in_the_chunks_run(windowed):
    # StreamingLLM sinks in the batched runtime: sequences of 1 to past 4W joining and leaving,
    # prompts read in chunks of 8 between decode steps. Each sequence's logits equal the float64
    # reference fed in the very chunks the scheduler gave it (a chunk's start sets its shift),
    # and the long ones part from HF's exact window, so the sinks were really used.
    ref, root = windowed
    llm, seen = engine(root, max_batch_size=4, prefill_chunk_size=8, max_step_tokens=20,
                       attention_sink_size=SINKS)
    worst, parted = check_sinks(ref, llm, seen)
    print(f"sinks {SINKS}: max |dlogit| against float64 {worst:.2e}; against HF's exact "
          f"window {parted:.2e}")
    assert worst <= TOL
    assert parted > 100 * TOL


def check_sinks(ref, llm, seen):
    """join_and_leave with sinks: (max |dlogit| against the float64 reference, against HF).

    Each sequence is compared with tests/reference.py::streaming_logits fed the chunks it ran
    in; HF (``ref``, its exact window) gives the second figure. Also checks that prefix caching
    is off and that every page, the sinks' included, is released at the end.
    """
    assert not llm.kv.prefix_caching  # a page's KV depends on the chunking: never shared
    chunks = defaultdict(list)
    run = llm.runner.run

    def recording(work):
        for w in work:
            chunks[w.seq.request_id].append((w.start, w.count))
        return run(work)

    llm.runner.run = recording
    prompts = join_and_leave(llm)
    state = {k: v.float().cpu().numpy() for k, v in ref.state_dict().items()}
    worst, parted = 0.0, 0.0
    for rid, prompt in prompts.items():
        tokens = list(prompt) + llm.outputs[rid].token_ids
        starts = [start for start, _ in chunks[rid]]
        assert starts == sorted(starts) and starts[0] == 0  # no preemption: one pass
        sizes = [count for _, count in chunks[rid]]
        fed = tokens[:sum(sizes)]  # the last sampled token is never fed
        want = streaming_logits(state, ref.config.to_dict(), fed, sizes, W, SINKS)
        want = want[len(prompt) - 1:]
        got = np.stack(seen[rid])
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))
        parted = max(parted, float(np.abs(got - hf_logits(ref, fed)[len(prompt) - 1:]).max()))
    for pool in llm.kv.pools:  # the sinks' pages are released with their sequences
        assert pool.in_use == 0
    return worst, parted


def test_sinks_are_refused_in_one_line_where_they_cannot_apply(model):
    # a model with a full-attention layer, or sinks past one page: one clear line, no engine
    name, _, root = model
    for sink in ([SINKS] if name != "windowed" else []) + [PAGE_SIZE + 1]:
        with pytest.raises(MistralCompileError, match=f"attention_sink_size={sink}"):
            LLM(root / "model", root / "lib.so", engine_config=EngineConfig(
                attention_sink_size=sink))


def test_padded_decode_steps_equal_hf_alone(model):
    # the CUDA graphs' padding, run here eagerly: every decode step runs as 8 rows (padding rows
    # on the scratch page) with full groups' tables a power of two wide; each sequence's logits
    # still equal HF's, so no padding row touched a sequence's KV
    name, ref, root = model
    llm, seen = engine(root, max_batch_size=4, prefill_chunk_size=8, max_step_tokens=20)
    llm.runner.pad_decode, llm.runner.row_buckets = True, [8]
    shapes = []
    fn = llm.runner.fn

    def recording(ids, positions, rows, last, sinks, tables, pools, params):
        shapes.append((int(ids.shape[0]), int(last.shape[0]), [int(t.shape[1]) for t in tables]))
        return fn(ids, positions, rows, last, sinks, tables, pools, params)

    llm.runner.fn = recording
    prompts = join_and_leave(llm)
    print(f"{name}: max |dlogit| {check_against_hf(ref, llm, seen, prompts):.2e}")
    padded = [widths for tokens, rows, widths in shapes if tokens == rows == 8]
    assert len(padded) > 10  # decode steps of 1 to 4 rows ran as 8
    full = [g for g, group in enumerate(llm.kv.groups) if group.window <= 0]
    for widths in padded:
        assert all(widths[g] & (widths[g] - 1) == 0 or widths[g] == llm.kv.widths[g]
                   for g in full)


def test_preemption_under_a_tiny_page_budget_gives_the_same_tokens(model):
    name, ref, root = model
    rng = np.random.default_rng(1)
    prompts = {i: rng.integers(3, 256, n).tolist() for i, n in enumerate([30, 45, 20, 60])}
    params = SamplingParams(max_tokens=24)

    def run(**settings):
        llm, seen = engine(root, max_batch_size=4, prefill_chunk_size=16, **settings)
        for i, p in prompts.items():
            llm.add_request(i, p, params)
        while llm.has_unfinished():
            llm.step()
        return llm, seen

    ample, _ = run()
    groups = ample.kv.groups
    widths = ample.kv.widths
    # one long sequence's worth of pages per group: the others must wait or be preempted
    tiny = [w if g.window > 0 else (60 + 24) // PAGE_SIZE + 1 for g, w in zip(groups, widths,
                                                                             strict=True)]
    small, seen = run(num_pages=tiny, prefix_caching=False)
    assert small.stats()["preemptions"] > 0
    for i in prompts:
        assert small.outputs[i].token_ids == ample.outputs[i].token_ids
    check_against_hf(ref, small, seen, prompts)


def test_a_shared_prefix_longer_than_the_window_is_shared_and_exact(model):
    name, ref, root = model
    llm, seen = engine(root, max_batch_size=4, prefill_chunk_size=16)
    rng = np.random.default_rng(2)
    prefix = rng.integers(3, 256, 3 * W + 2).tolist()  # 50 tokens: 3 full pages
    prompts = {"a": prefix + rng.integers(3, 256, 10).tolist(),
               "b": prefix + rng.integers(3, 256, 9).tolist()}
    llm.add_request("a", prompts["a"], SamplingParams(max_tokens=6))
    while len(llm.outputs["a"].token_ids) < 1:  # a's prompt is in the cache
        llm.step()
    llm.add_request("b", prompts["b"], SamplingParams(max_tokens=6))
    llm.step()
    b = llm._seqs["b"]
    assert b.cached_tokens == 3 * PAGE_SIZE
    shared = 0
    for g, pool in enumerate(llm.kv.pools):
        mine = set(b.pages.held[g].values())
        theirs = set(llm._seqs["a"].pages.held[g].values())
        for page in mine & theirs:
            assert pool.refs[page] == 2
            shared += 1
    assert shared > 0  # the same physical pages, counted twice
    while llm.has_unfinished():
        llm.step()
    check_against_hf(ref, llm, seen, prompts)
    assert llm.stats()["prefix_hit_tokens"] == 3 * PAGE_SIZE


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(windowed):
    _, root = windowed
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, n).tolist() for n in (12, 40, 5, 70)]
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=20)
              for i in range(4)]
    llm, _ = engine(root, max_batch_size=4, prefill_chunk_size=8)
    together = [o.token_ids for o in llm.generate(prompts, params)]
    for prompt, p, want in zip(prompts, params, together, strict=True):
        alone, _ = engine(root, max_batch_size=1, prefill_chunk_size=16)
        assert alone.generate([prompt], p)[0].token_ids == want
    greedy = llm.generate(prompts[:1], SamplingParams(max_tokens=20))[0].token_ids
    assert together[0] != greedy  # sampling, not an argmax


def test_a_windowed_sequence_holds_pages_for_its_window_only(windowed):
    ref, root = windowed
    llm, seen = engine(root, max_batch_size=2, prefill_chunk_size=8)
    prompt = np.random.default_rng(4).integers(3, 256, 40).tolist()
    llm.add_request(0, prompt, SamplingParams(max_tokens=200))
    width = llm.kv.widths[0]
    most = 0
    while llm.has_unfinished():
        llm.step()
        most = max(most, llm.kv.pools[0].in_use)
    assert most <= width < (40 + 200) // PAGE_SIZE
    check_against_hf(ref, llm, seen, {0: prompt})


def test_abort_frees_the_pages_at_once(windowed):
    _, root = windowed
    llm, _ = engine(root, max_batch_size=2, prefill_chunk_size=8, prefix_caching=False)
    llm.add_request("x", list(range(3, 60)), SamplingParams(max_tokens=50))
    llm.add_request("y", list(range(3, 30)), SamplingParams(max_tokens=50))
    for _ in range(10):
        llm.step()
    before = llm.kv.pools[0].in_use
    llm.abort("x")
    assert llm.outputs["x"].finish_reason == "abort"
    assert llm.kv.pools[0].in_use < before
    while llm.has_unfinished():
        llm.step()
    assert llm.kv.pools[0].in_use == 0
    assert len(llm.outputs["y"].token_ids) == 50


def test_the_single_sequence_engine_samples_on_the_device_as_the_batch_does(windowed):
    # Engine (owned cache, batch 1) and LLM (paged, batched) share the device sampler and its
    # noise keys: the same seed gives the same tokens
    from mistral_compile.runtime import Engine

    _, root = windowed
    prompt = np.random.default_rng(6).integers(3, 256, 30).tolist()
    options = dict(temperature=0.9, top_p=0.95, top_k=40, repetition_penalty=1.2, seed=7)
    single = Engine(root / "model", root / "lib.so", attention_sink_size=0)
    engine_tokens = single.generate(prompt, 24, **options)
    llm, _ = engine(root, max_batch_size=2, prefill_chunk_size=16)
    batch = llm.generate([prompt, prompt[:9]], SamplingParams(max_tokens=24, **options))
    assert engine_tokens == batch[0].token_ids
    assert engine_tokens != single.generate(prompt, 24)  # sampling, not an argmax


def test_a_sequence_that_outgrows_the_cache_alone_ends_with_length(model):
    name, ref, root = model
    llm, seen = engine(root, max_batch_size=2, prefill_chunk_size=16,
                       num_pages=[4] * len(set(MODELS[name][1].get("layer_types", [0]))))
    prompt = np.random.default_rng(7).integers(3, 256, 40).tolist()
    out = llm.generate([prompt], SamplingParams(max_tokens=100))[0]
    assert out.finish_reason == "length"
    if name == "windowed":  # the ring always fits: the budget ends it
        assert len(out.token_ids) == 100
    else:  # full layers hold every token: the 4 pages (64 tokens) end it
        assert len(prompt) + len(out.token_ids) <= 4 * PAGE_SIZE + 1
