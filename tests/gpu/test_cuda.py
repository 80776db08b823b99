"""GPU checks of CUDA libraries built by scripts/gpu/prepare.py (run: scripts/gpu/run.sh).

Fidelity of the tiny models against Hugging Face on the same GPU, attention sinks against the
float64 reference, and the Mistral-7B-shaped window receipt. Skipped without a GPU or without
the prepared folder (MISTRAL_COMPILE_GPU_DIR, default dist-gpu/).
"""

import os
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
GPU_DIR = Path(os.environ.get("MISTRAL_COMPILE_GPU_DIR", REPO / "dist-gpu"))
W = 16
DECODE_STEPS = 32
LENGTHS = [1, W - 1, W, W + 1, 3 * W + 5]
CHUNKS = {"below": W // 2 - 1, "equal": W, "above": 2 * W}
TOL = {"q0f32": 1e-3, "q0f16": 5e-2}

if not torch.cuda.is_available() or not (GPU_DIR / "prepared.json").is_file():
    pytest.skip("needs an NVIDIA GPU and the prepared dist-gpu/ folder", allow_module_level=True)

from reference import streaming_logits  # noqa: E402

from mistral_compile.runtime import Engine  # noqa: E402
from mistral_compile.weights.mapping import HF, build_name_map  # noqa: E402

_hf_cache: dict = {}


def hf_model(name, quant):
    """HF on the GPU: fp32 or fp16; for q4f16_*, fp16 with the dequantized q4 weights."""
    key = (name, quant)
    if key not in _hf_cache:
        dtype = torch.float32 if quant == "q0f32" else torch.float16
        model = transformers.AutoModelForCausalLM.from_pretrained(
            GPU_DIR / "tiny" / name / "hf", dtype=torch.float32, attn_implementation="eager")
        if quant.startswith("q4"):
            from test_quantize import _dequantized_reference

            model = _dequantized_reference(model, GPU_DIR / "tiny" / name / quant)
        _hf_cache[key] = model.to(dtype).cuda().eval()
    return _hf_cache[key]


def engine(name, quant, **kw):
    root = GPU_DIR / "tiny" / name / quant
    return Engine(root, root / "lib.so", device="cuda", **kw)


def run_engine(eng, ids):
    eng.reset()
    got = [eng.prefill(ids)]
    seq = list(ids)
    for _ in range(DECODE_STEPS):
        seq.append(int(np.argmax(got[-1])))
        got.append(eng.decode(seq[-1]))
    return got, seq


def report(label, delta, same):
    print(f"RESULT {label}: max|dlogit| {delta:.2e}, greedy tokens identical: {same}")


def compare_hf(name, quant, n, chunk, sink=0):
    eng = engine(name, quant, attention_sink_size=sink, prefill_chunk_size=chunk)
    ids = np.random.default_rng(n).integers(3, 256, n).tolist()
    got, seq = run_engine(eng, ids)
    with torch.no_grad():
        want = hf_model(name, quant)(torch.tensor([seq], device="cuda")).logits[0]
    want = want.float().cpu().numpy()[n - 1:]
    delta = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    same = [int(np.argmax(g)) for g in got] == [int(np.argmax(w)) for w in want]
    report(f"{name} {quant} prompt {n:3d} chunk {eng.chunk_size:3d}", delta, same)
    return delta, same


@pytest.mark.parametrize("chunk", list(CHUNKS.values()), ids=list(CHUNKS))
@pytest.mark.parametrize("n", LENGTHS)
def test_windowed_fp32_matches_hf(n, chunk):
    delta, same = compare_hf("windowed", "q0f32", n, chunk)
    assert delta <= TOL["q0f32"] and same


@pytest.mark.parametrize("n", [1, W - 1, W])
def test_windowed_fp16_inside_window(n):
    delta, same = compare_hf("windowed", "q0f16", n, W)
    assert delta <= TOL["q0f16"] and same


@pytest.mark.parametrize("quant", ["q4f16_1", "q4f16_2"])
@pytest.mark.parametrize("n", [1, W - 1, W])
def test_windowed_q4_matches_its_dequantized_weights(n, quant):
    # decode runs our q4 GEMV kernel (half2 products; q4f16_2: plus each group's minimum times
    # its sum of x), prefill dequantize + tensor-core GEMM
    compare_q4("windowed", quant, n)


@pytest.mark.parametrize("name, n, chunk", [
    ("heads128", 1, 64), ("heads128", 5 * W + 3, 64), ("heads128_full", 140, 64),
    ("heads128_full", 300, 128), ("heads128_full", 300, 256), ("heads128_full", 450, 512)])
def test_head_dim_128_fp16_prefill_matches_hf_float32(name, n, chunk):
    # head_dim 128 in float16 on sm_90: a prefill chunk's attention runs
    # mc::prefill_attn_owned_wgmma (128-row tiles, the ring wrapped by the windowed model's
    # chunks); against HF in float32 on the same weights
    eng = engine(name, "q0f16", attention_sink_size=0, prefill_chunk_size=chunk)
    ids = np.random.default_rng(n).integers(3, 256, n).tolist()
    got, seq = run_engine(eng, ids)
    with torch.no_grad():
        want = hf_model(name, "q0f32")(torch.tensor([seq], device="cuda")).logits[0]
    want = want.float().cpu().numpy()[n - 1:]
    check_within(got, want, f"{name} q0f16 prompt {n:3d} chunk {eng.chunk_size:3d} vs HF fp32")


def check_within(got, want, label):
    """max|dlogit| <= the fp16 tolerance; greedy tokens may part only at a near-tie.

    A near-tie: HF's top two logits closer than 2 max|dlogit|.
    """
    delta = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    parted = [i for i, (g, w) in enumerate(zip(got, want, strict=True))
              if int(np.argmax(g)) != int(np.argmax(w))]
    report(label, delta, not parted)
    assert delta <= TOL["q0f16"]
    for i in parted:
        top2 = np.sort(want[i])[-2:]
        print(f"  greedy parts at step {i}: HF top-2 gap {top2[1] - top2[0]:.1e}")
        assert top2[1] - top2[0] <= 2 * delta, (i, top2)


def test_sampled_steps_queued_ahead_draw_the_serial_loops_tokens():
    # on CUDA, continue_from queues each decode step before its sampled id is read (the id
    # stays on the device, the next draw's penalties are built while the step runs): the same
    # tokens as the loop that reads each id before the step, and the same cache
    from mistral_compile.runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=7)
    ids = np.random.default_rng(3).integers(3, 256, 20).tolist()
    runs, caches = [], []
    for ahead in (True, False):
        eng = engine("windowed", "q0f32", attention_sink_size=0, prefill_chunk_size=W)
        assert eng.kv.reader is not None
        if not ahead:
            eng.kv.reader = None  # the serial loop
        eng.reset()
        tokens = eng.continue_from(eng.prefill(ids), params, None, ids)
        runs.append([next(tokens) for _ in range(3 * W)])
        caches.append(list(eng.tokens))
    print(f"RESULT sampled ahead/serial: {runs[0][:12]} / {runs[1][:12]}")
    assert runs[0] == runs[1] and caches[0] == caches[1]
    assert len(set(runs[0])) > 5  # a real draw, not one token repeated


def test_host_uploads_queue_behind_the_stream_and_keep_their_values():
    # the sampler's inputs go up without waiting for the stream (HostUploads): queued behind a
    # long memset, 12 batches through two pinned slots must each land with their own values
    # (a slot rewritten before its copies ran would leave a later batch's values behind)
    import tvm

    from mistral_compile.runtime.library import HostUploads, zeros

    dev = tvm.cuda(0)
    uploads = HostUploads(0)
    targets = [tvm.runtime.empty((4096,), "int32", dev) for _ in range(12)]
    big = zeros((2**31,), "float32", dev)  # 8 GiB: about 2 ms of work ahead of the copies
    for i, target in enumerate(targets):
        uploads.begin()
        uploads.put(np.full(4096, i, dtype="int32"), target)
        uploads.end()
    got = [int(np.unique(t.numpy())[0]) if len(np.unique(t.numpy())) == 1 else -1
           for t in targets]
    assert got == list(range(12))
    del big


@pytest.mark.parametrize("quant, folder", [("q0f16", "tp2"), ("q4f16_1", "tp2-q4")])
def test_two_shards_sharing_the_gpu_equal_one_shard(quant, folder):
    # a 2-shard library (tensor parallelism) in two processes on the one GPU: the all-reduce
    # sums CUDA tensors through gloo (NCCL takes one GPU per rank). The logits of a prompt past
    # the window and of greedy steps are one shard's (and, in float16, HF's) to float16's
    # tolerance (each shard's partial sums are rounded before they are added); the batched
    # runtime (pages sized by hand: both processes share the memory) gives one shard's tokens
    from mistral_compile.runtime.llm import LLM, EngineConfig
    from mistral_compile.runtime.sampling import SamplingParams

    root = GPU_DIR / "tiny" / "windowed" / folder
    if not root.is_dir():
        pytest.skip(f"dist-gpu/tiny/windowed/{folder} not prepared")
    ids = np.random.default_rng(11).integers(3, 256, 3 * W + 5).tolist()
    one, seq = run_engine(engine("windowed", quant, attention_sink_size=0,
                                 prefill_chunk_size=W), ids)
    two = Engine(root, root / "lib.so", device="cuda", attention_sink_size=0,
                 prefill_chunk_size=W)
    single = engine("windowed", quant, attention_sink_size=0, prefill_chunk_size=W)
    try:  # the same tokens fed (one shard's greedy choices), so the logits line up
        got = [two.prefill(ids)] + [two.decode(t) for t in seq[len(ids):]]
        # generate's loops (greedy, sampled) send each step with its token to both shards
        for options in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}):
            assert two.generate(ids, 12, **options) == single.generate(ids, 12, **options)
    finally:
        two.close()
    d_one = max(float(np.abs(g - w).max()) for g, w in zip(got, one, strict=True))
    line = f"RESULT 2 shards on one GPU, {quant}: max|dlogit| {d_one:.2e} vs 1 shard"
    assert d_one <= TOL["q0f16"]
    if quant == "q0f16":
        with torch.no_grad():
            hf = hf_model("windowed", quant)(torch.tensor([seq], device="cuda")).logits[0]
        hf = hf.float().cpu().numpy()[len(ids) - 1:]
        d_hf = max(float(np.abs(g - w).max()) for g, w in zip(got, hf, strict=True))
        line += f", {d_hf:.2e} vs HF"
        assert d_hf <= TOL["q0f16"]
    print(line)
    settings = EngineConfig(max_batch_size=3, prefill_chunk_size=16, num_pages=[64])
    prompts = [np.random.default_rng(n).integers(3, 256, n).tolist() for n in (5, 40, 23)]
    params = SamplingParams(max_tokens=8)
    sharded = LLM(root, root / "lib.so", device="cuda", engine_config=settings)
    try:
        got = [o.token_ids for o in sharded.generate(prompts, params)]
    finally:
        sharded.close()
    single = GPU_DIR / "tiny" / "windowed" / quant
    want = LLM(single, single / "lib.so", device="cuda", engine_config=settings)
    assert got == [o.token_ids for o in want.generate(prompts, params)]


def compare_q4(name, quant, n):
    """The engine against HF fp16 on the dequantized 4-bit weights, prefill chunk W."""
    eng = engine(name, quant, attention_sink_size=0, prefill_chunk_size=W)
    ids = np.random.default_rng(n).integers(3, 256, n).tolist()
    got, seq = run_engine(eng, ids)
    with torch.no_grad():
        want = hf_model(name, quant)(torch.tensor([seq], device="cuda")).logits[0]
    want = want.float().cpu().numpy()[n - 1:]
    check_within(got, want, f"{name} {quant} prompt {n:3d} vs dequantized HF fp16")


@pytest.mark.parametrize("quant", ["q0f32", "q0f16"])
@pytest.mark.parametrize("name, n", [("full", 1), ("full", 40), ("full", 3 * W + 5),
                                     ("per_layer", W - 1), ("per_layer", W + 1),
                                     ("per_layer", 3 * W + 5)])
def test_other_models_match_hf(name, n, quant):
    delta, same = compare_hf(name, quant, n, W)
    if quant == "q0f32" or n <= W:
        assert delta <= TOL[quant] and same


@pytest.mark.parametrize("quant", ["q0f32", "q0f16", "q4f16_1"])
@pytest.mark.parametrize("n", [1, W + 1, 3 * W + 5])
def test_mixtral_matches_hf(n, quant):
    # decode steps read only the chosen experts' rows (mc::gemv_expert / gemv_q4_expert, the
    # router and top-k on the device); prefill runs every expert weighted by the routing
    if not (GPU_DIR / "tiny" / "mixtral").is_dir():
        pytest.skip("dist-gpu/tiny/mixtral not prepared")
    if quant.startswith("q4"):
        compare_q4("mixtral", quant, n)
        return
    delta, same = compare_hf("mixtral", quant, n, W)
    assert delta <= TOL[quant] and same


@pytest.mark.parametrize("quant", ["q0f32", "q0f16", "q4f16_1", "q4f16_2"])
def test_device_greedy_matches_host_argmax(quant):
    # Engine.greedy: our argmax kernel on the device, its output fed to the next step (inside
    # the decode function, CUDA graph and all), never the host; the host path reads the logits
    # of the same steps and takes numpy's argmax. Through the window (3W steps).
    dev = engine("windowed", quant, attention_sink_size=0, prefill_chunk_size=W)
    host = engine("windowed", quant, attention_sink_size=0, prefill_chunk_size=W)
    ids = np.random.default_rng(11).integers(3, 256, W + 3).tolist()
    first = int(np.argmax(dev.prefill(ids)))
    host.prefill(ids)
    steps, token, got, want = dev.greedy(first), first, [], []
    for _ in range(3 * W):
        logits = host.decode(token)
        token = int(np.argmax(logits))
        want.append(token)
        got.append(next(steps))
    print(f"RESULT device greedy {quant}, {3 * W} steps: tokens identical to the host "
          f"argmax of the same steps' logits: {got == want}")
    assert got == want


def test_greedy_queued_ahead_leaves_the_cache_exact():
    # on the owned cache, Engine.greedy queues the step after the one it reads; dropping the
    # generator must leave that step's token out of the cache (its slot is written again).
    # An engine that never ran ahead (host decode steps) must then agree exactly, through the
    # window's ring (64 slots: 3W steps go round it).
    ahead = engine("windowed", "q0f32", attention_sink_size=0, prefill_chunk_size=W)
    plain = engine("windowed", "q0f32", attention_sink_size=0, prefill_chunk_size=W)
    ids = np.random.default_rng(13).integers(3, 256, W + 3).tolist()
    first = int(np.argmax(ahead.prefill(ids)))
    plain.prefill(ids)
    steps = ahead.greedy(first)
    got = [next(steps) for _ in range(3 * W)]
    del steps  # one step was queued ahead, fed with got[-1]
    for token in [first, *got[:-1]]:
        plain.decode(token)
    assert ahead.length == plain.length and ahead.tokens == plain.tokens
    token, delta = got[-1], 0.0
    for _ in range(W):
        a, b = ahead.decode(token), plain.decode(token)
        delta = max(delta, float(np.abs(a - b).max()))
        token = int(np.argmax(b))
    assert ahead.rollback(W) and plain.rollback(W)
    delta = max(delta, float(np.abs(ahead.decode(token) - plain.decode(token)).max()))
    report("greedy queued ahead, then host decode and a rollback, vs never ahead", delta,
           delta == 0.0)
    assert delta == 0.0


@pytest.mark.parametrize("chunk", [W // 2 - 1, W - 1])
def test_owned_ring_wraps_in_prefill_fp32(chunk):
    # the owned cache of the windowed model is a ring of 64 slots: a 6W-token prompt goes round
    # it inside prefill (the split-KV kernel reads the slots), decode goes round it again
    delta, same = compare_hf("windowed", "q0f32", 6 * W + 3, chunk)
    assert delta <= TOL["q0f32"] and same


@pytest.mark.parametrize("name, n", [("windowed", 6 * W + 3), ("full", 3 * W + 5)])
def test_owned_cache_equals_paged_fp16(name, n):
    # fp16 prefill on the owned cache is the tensor-core kernel over the slots (ring wrap and
    # window mask included); on the paged cache it is TVM's cache with our ragged kernel. Same
    # library, same weights: the two must agree to fp16 rounding at every step.
    ids = np.random.default_rng(n).integers(3, 256, n).tolist()
    runs = {}
    for kv in ("owned", "paged"):
        eng = engine(name, "q0f16", attention_sink_size=0, prefill_chunk_size=W - 1,
                     kv_cache=kv)
        runs[kv] = run_engine(eng, ids)
    (owned, seq_o), (paged, seq_p) = runs["owned"], runs["paged"]
    delta = max(float(np.abs(a - b).max()) for a, b in zip(owned, paged, strict=True))
    report(f"{name} q0f16 prompt {n:3d} owned vs paged cache", delta, seq_o == seq_p)
    assert delta <= TOL["q0f16"] and seq_o == seq_p


@pytest.mark.parametrize("chunk", list(CHUNKS.values()), ids=list(CHUNKS))
@pytest.mark.parametrize("n", LENGTHS)
def test_sinks_fp32_match_reference(n, chunk):
    eng = engine("windowed", "q0f32", attention_sink_size=4, prefill_chunk_size=chunk)
    ids = np.random.default_rng(n).integers(3, 256, n).tolist()
    eng.reset()
    chunks = eng.prefill_chunks(n) + [1] * DECODE_STEPS
    got, seq = run_engine(eng, ids)
    ref = hf_model("windowed", "q0f32")
    state = {k: v.float().cpu().numpy() for k, v in ref.state_dict().items()}
    want = streaming_logits(state, ref.config.to_dict(), seq, chunks, W, 4)[n - 1:]
    delta = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    same = [int(np.argmax(g)) for g in got] == [int(np.argmax(w)) for w in want]
    report(f"sinks 4 q0f32 prompt {n:3d} chunk {eng.chunk_size:3d} vs float64", delta, same)
    assert delta <= TOL["q0f32"] and same


def test_mistral_7b_window_receipt():
    """7B shape, fp16, random weights on the GPU, window 4096, prompt of 6144 tokens."""
    ref = random_7b_reference()
    state = ref.state_dict()
    window = Engine(GPU_DIR / "7b-window", GPU_DIR / "7b-window" / "lib.so", device="cuda",
                    params=_fused(window_cfg := GPU_DIR / "7b-window", state))
    full = Engine(GPU_DIR / "7b-full", GPU_DIR / "7b-full" / "lib.so", device="cuda",
                  params=_fused(GPU_DIR / "7b-full", state))
    assert window_cfg.is_dir() and window.window == 4096 and full.window == -1
    ids = np.random.default_rng(7).integers(3, 32000, 6144).tolist()
    torch.cuda.synchronize()
    got_window, got_full = window.prefill(ids), full.prefill(ids)
    with torch.no_grad():
        want = ref(torch.tensor([ids], device="cuda"), logits_to_keep=1).logits[0, -1]
    want = want.float().cpu().numpy()
    d_hf = float(np.abs(got_window - want).max())
    d_full = float(np.abs(got_window - got_full).max())
    top = (int(np.argmax(got_window)), int(np.argmax(want)), int(np.argmax(got_full)))
    print(f"RESULT 7B fp16 window 4096 prompt 6144: engine vs HF max|d| {d_hf:.3f}, top-1 "
          f"engine/HF/full-attention {top}; windowed vs full-attention engine max|d| "
          f"{d_full:.3f}; logit std {float(want.std()):.3f}")
    assert d_hf <= 0.25 and top[0] == top[1]
    assert d_full > 4 * max(d_hf, 0.05)


def test_mixtral_8x7b_shape_matches_hf_float32():
    """The Mixtral-8x7B shape (2 of its 32 layers), fp16, random weights on the GPU: a 2100-token
    prompt (prefill on the tensor cores, every expert) and one decode step (the chosen experts'
    GEMVs) against HF in float32 on the same float16 weights (issue 21).

    Two layers so that HF fits in float32 beside us. Against HF in float16 the comparison says
    little: its own rounding flips the top-2 expert choice of 4-9% of the tokens per layer at
    this length (measured), and 32 random layers turn a flip into logits far apart; the full
    depth is measured by scripts/gpu/mixtral_precision.py (docs/benchmarks.md).
    """
    root = GPU_DIR / "mixtral-8x7b-2l"
    if not root.is_dir():
        pytest.skip("dist-gpu/mixtral-8x7b-2l not prepared")
    ref32 = random_mixtral_reference(torch.float32, num_hidden_layers=2)
    ref16 = random_mixtral_reference(torch.float16, num_hidden_layers=2, like=ref32)
    ids = np.random.default_rng(7).integers(3, 32000, 2101).tolist()  # the last: a decode step
    with torch.no_grad():
        want = ref32(torch.tensor([ids], device="cuda"), logits_to_keep=2).logits[0]
        want16 = ref16(torch.tensor([ids], device="cuda"), logits_to_keep=2).logits[0]
    want, want16 = want.cpu().numpy(), want16.float().cpu().numpy()
    eng = Engine(root, root / "lib.so", device="cuda", params=_fused(root, ref16.state_dict()))
    got = [eng.prefill(ids[:-1]), eng.decode(ids[-1])]
    for i, label in enumerate(("prefill 2100", "decode step")):
        d = float(np.abs(got[i] - want[i]).max())
        d16 = float(np.abs(want16[i] - want[i]).max())
        top = (int(np.argmax(got[i])), int(np.argmax(want[i])))
        print(f"RESULT Mixtral-8x7B shape (2 layers) fp16 {label}: engine vs HF float32 "
              f"max|d| {d:.4f} (HF float16: {d16:.4f}), top-1 engine/HF {top}")
        assert d <= 0.25 and top[0] == top[1]


def random_mixtral_reference(dtype, like=None, **overrides):
    """HF MixtralForCausalLM, Mixtral-8x7B config (``overrides`` applied), random, on the GPU.

    ``like``: a model whose weights to copy (cast to ``dtype``) instead of drawing new ones.
    """
    import copy
    import json

    if like is not None:
        return copy.deepcopy(like).to(dtype)
    cfg = json.loads((REPO / "configs" / "mixtral-8x7b-v0.1.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
    hf_cfg = transformers.MixtralConfig(**{**cfg, **overrides}, attn_implementation="eager")
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(dtype)
        try:
            return transformers.MixtralForCausalLM(hf_cfg).eval()
        finally:
            torch.set_default_dtype(torch.float32)


def random_7b_reference():
    """HF MistralForCausalLM, Mistral-7B config (window 4096), random fp16, on the GPU."""
    import json

    cfg = json.loads((REPO / "configs" / "mistral-7b-v0.1.json").read_text())
    hf_cfg = transformers.MistralConfig(**{k: v for k, v in cfg.items()
                                           if k not in ("architectures", "torch_dtype")},
                                        attn_implementation="eager")
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.float16)
        try:
            return transformers.MistralForCausalLM(hf_cfg).eval()
        finally:
            torch.set_default_dtype(torch.float32)


def _fused(model_dir, state):
    """Our parameter names built from the HF state dict through the conversion name map."""
    from mistral_compile.config import read_config

    params = {}
    for name, spec in build_name_map(read_config(model_dir), HF).items():
        if name in state:  # the same name in memory: embeddings, norms, Mixtral's router
            params[name] = state[name]
            continue
        if spec.stacked:  # transformers 5 holds experts stacked as we do: [E, rows, cols]
            params[name] = state[name.removesuffix(".weight")]
            continue
        parts = [state[s] for s in spec.sources]
        params[name] = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    return params


def test_chat_turn_on_cuda_matches_cpu():
    """Two seeded chat turns (real v3 tokenizer) on the CUDA library equal the CPU library's.

    Sampled (temperature 0.8, seed 0), not greedy: this random model with tied embeddings
    greedily repeats one control token, which would compare nothing.
    """
    root = GPU_DIR / "chat" / "q0f32"
    msgs = [{"role": "user", "content": "Hello, GPU!"}]
    gpu = Engine(root, root / "lib.so", device="cuda")
    cpu = Engine(root, root / "lib-cpu.so", device="cpu")
    texts = []
    for eng in (gpu, cpu):
        first = eng.chat(msgs, max_tokens=24, temperature=0.8, seed=0)
        texts.append("".join(first))
        follow = msgs + [{"role": "assistant", "content": first.text},
                         {"role": "user", "content": "And again?"}]
        second = eng.chat(follow, max_tokens=24, temperature=0.8, seed=1)
        texts.append("".join(second))
        print(f"RESULT chat on {eng.device}: prefilled {second.usage.prefilled_tokens} of "
              f"{second.usage.prompt_tokens} prompt tokens in turn 2; decode "
              f"{first.usage.decode_tokens_per_second:.0f} tok/s")
    print(f"RESULT chat texts (GPU == CPU): {texts[:2]!r}")
    assert texts[:2] == texts[2:] and all(texts)


def test_chat_cli_session_on_cuda(run_cli):
    """The REPL on the GPU, fed from a pipe: a captured session."""
    root = GPU_DIR / "chat" / "q0f16"
    proc = run_cli("chat", root, "--lib", root / "lib.so", "--device", "cuda:0", "--seed", "0",
                   "--max-tokens", "24", input="Hello from the H100\n/stats\nAnd a follow-up\n"
                   "/stats\n/exit\n")
    print("SESSION\n" + proc.stdout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = re.findall(r"prompt (\d+) tokens, prefilled (\d+)", proc.stdout)
    assert len(stats) == 2 and int(stats[1][1]) < int(stats[1][0]) // 2
