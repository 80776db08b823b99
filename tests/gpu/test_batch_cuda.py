"""The batched runtime on the GPU (CUDA libraries from scripts/gpu/prepare.py) against HF."""

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
GPU_DIR = Path(os.environ.get("MISTRAL_COMPILE_GPU_DIR", REPO / "dist-gpu"))
TOL = {"q0f32": 1e-3, "q0f16": 5e-2, "q4f16_1": 5e-2, "q4f16_2": 5e-2}
W = 16

if not torch.cuda.is_available() or not (GPU_DIR / "prepared.json").is_file():
    pytest.skip("needs an NVIDIA GPU and the prepared dist-gpu/ folder", allow_module_level=True)

from test_batch import SINKS, check_against_hf, check_sinks, engine, join_and_leave  # noqa: E402

from mistral_compile.runtime.sampling import SamplingParams  # noqa: E402

MODELS = ["windowed", "full", "per_layer"]


def hf(name, quant):
    """HF on the GPU: fp32 or fp16; for q4f16_*, fp16 with the dequantized q4 weights."""
    dtype = torch.float32 if quant == "q0f32" else torch.float16
    model = transformers.AutoModelForCausalLM.from_pretrained(
        GPU_DIR / "tiny" / name / "hf", dtype=torch.float32, attn_implementation="eager")
    if quant.startswith("q4"):
        from test_quantize import _dequantized_reference

        model = _dequantized_reference(model, GPU_DIR / "tiny" / name / quant)
    return model.to(dtype).cuda().eval()


def gpu_engine(name, quant, **settings):
    root = GPU_DIR / "tiny" / name / quant
    settings.setdefault("kv_cache_bytes", 64 << 20)  # many engines share the GPU in one process
    return engine(root, root, root / "lib.so", "cuda", **settings)


CASES = [(name, quant) for name in MODELS for quant in ("q0f32", "q0f16")] + [
    ("wide", "q0f16"), ("wide", "q4f16_1"), ("wide", "q4f16_2"),
    ("mixtral", "q0f32"), ("mixtral", "q0f16")]  # experts: every expert, routing-weighted


@pytest.mark.parametrize(("name", "quant"), CASES)
def test_sequences_joining_and_leaving_equal_hf_alone(name, quant):
    # wide: steps of up to 100 rows (two slabs of the skinny GEMM), else 20
    big = name == "wide"
    llm, seen = gpu_engine(name, quant, max_batch_size=4, prefill_chunk_size=64 if big else 8,
                           max_step_tokens=100 if big else 20)
    prompts = join_and_leave(llm)
    worst = check_against_hf(hf(name, quant), llm, seen, prompts, TOL[quant])
    print(f"{name} {quant}: max |dlogit| {worst:.2e}")


@pytest.mark.parametrize("quant", ["q0f32", "q0f16"])
def test_sinks_equal_the_float64_reference(quant):
    # mc::paged_attn_partial's sink keys (split 0, q rotated back by the shift) and the recent
    # keys from the sink count on: each sequence against the float64 reference in its chunks
    llm, seen = gpu_engine("windowed", quant, max_batch_size=4, prefill_chunk_size=8,
                           max_step_tokens=20, attention_sink_size=SINKS)
    worst, parted = check_sinks(hf("windowed", "q0f32"), llm, seen)
    print(f"sinks {SINKS} windowed {quant}: max |dlogit| against float64 {worst:.2e}; against "
          f"HF's exact window {parted:.2e}")
    assert worst <= TOL[quant] and parted > 0.2


@pytest.mark.parametrize("name", MODELS + ["wide"])
def test_decode_steps_replayed_from_cuda_graphs_equal_hf_and_eager(name):
    # 12 sequences of 1 to 64 tokens joining at once: decode steps of 9 to 12 rows run as 16
    # (padding rows on the scratch page), fewer rows as themselves; each shape is captured once
    rng = np.random.default_rng(2)
    prompts = {i: rng.integers(3, 256, n).tolist()
               for i, n in enumerate([1, 5, 17, 33, 2, 9, 40, 3, 11, 20, 7, 64])}
    tokens = {}
    for graphs in (True, False):
        llm, seen = gpu_engine(name, "q0f16", max_batch_size=12, prefill_chunk_size=8,
                               max_step_tokens=40, cuda_graphs=graphs)
        for i, prompt in prompts.items():
            llm.add_request(i, prompt, SamplingParams(max_tokens=12 + i))
        while llm.has_unfinished():
            llm.step()
        tokens[graphs] = {i: llm.outputs[i].token_ids for i in prompts}
        if graphs:
            assert llm.runner.graphs is not None and len(llm.runner.graphs.graphs) >= 3
            assert any(key[0] == 16 for key in llm.runner.graphs.graphs)
            worst = check_against_hf(hf(name, "q0f16"), llm, seen, prompts, TOL["q0f16"])
            print(f"{name}: {len(llm.runner.graphs.graphs)} graphs, max |dlogit| {worst:.2e}")
        else:
            assert llm.runner.graphs is None
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("name", MODELS)
def test_preemption_and_prefix_sharing_give_the_same_tokens(name):
    rng = np.random.default_rng(1)
    prefix = rng.integers(3, 256, 3 * W + 2).tolist()
    prompts = {i: prefix + rng.integers(3, 256, n).tolist() for i, n in enumerate([3, 20, 9])}
    params = SamplingParams(max_tokens=24)
    outs = {}
    probe, _ = gpu_engine(name, "q0f32")
    tiny = [w if g.window > 0 else 8 for g, w in zip(probe.kv.groups, probe.kv.widths,
                                                      strict=True)]
    for label, settings in (("ample", {}), ("tiny", {"num_pages": tiny}),
                            ("unshared", {"prefix_caching": False})):
        llm, _ = gpu_engine(name, "q0f32", max_batch_size=4, prefill_chunk_size=16, **settings)
        outs[label] = [o.token_ids for o in llm.generate(list(prompts.values()), params)]
        if label == "tiny":
            assert llm.stats()["preemptions"] > 0
        if label == "ample":
            assert llm.stats()["prefix_hit_tokens"] > 0
    assert outs["ample"] == outs["tiny"] == outs["unshared"]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch():
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, n).tolist() for n in (12, 40, 5, 70)]
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, max_tokens=20)
              for i in range(4)]
    llm, _ = gpu_engine("windowed", "q0f32", max_batch_size=4, prefill_chunk_size=8)
    together = [o.token_ids for o in llm.generate(prompts, params)]
    for prompt, p, want in zip(prompts, params, together, strict=True):
        alone, _ = gpu_engine("windowed", "q0f32", max_batch_size=1, prefill_chunk_size=16)
        assert alone.generate([prompt], p)[0].token_ids == want


def test_the_cuda_sampler_equals_the_numpy_definition():
    import sampling_reference as ref
    import tvm
    from sampling_reference import CASES

    from mistral_compile.runtime.sampler import adjustments, options_row

    llm, _ = gpu_engine("windowed", "q0f32")
    fn = llm.artifact.vm["sample"]
    dev = llm.artifact.device
    rng = np.random.default_rng(5)
    for params in CASES:
        logits = rng.normal(0, 3, (32, 256)).astype("float32")
        seeds = rng.integers(0, 2**32, 32).tolist()
        options = np.array([options_row(params)] * 32, dtype="float32")
        keys = np.array([[s, 0] for s in seeds], dtype="int64").astype("uint32").view("int32")
        up = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
        tokens, _ = fn(up(logits), up(options), up(keys), up(np.zeros((1, 4), "int32")),
                       up(np.zeros(1, "float32")))
        want = [ref.sample(row, params, s) for row, s in zip(logits, seeds, strict=True)]
        assert tokens.numpy().tolist() == want, params
    assert adjustments(SamplingParams(), [1], [2]) == []
