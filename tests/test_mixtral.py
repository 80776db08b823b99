"""Mixtral (mixture of experts) on the CPU against transformers' MixtralForCausalLM, float32."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import native_tensors, tiny_library  # noqa: E402
from test_batch import check_against_hf, engine, join_and_leave  # noqa: E402
from test_fidelity import compare  # noqa: E402
from test_quantize import _dequantized_reference  # noqa: E402

from mistral_compile.compiler.pipeline import compile_model  # noqa: E402
from mistral_compile.runtime import Engine  # noqa: E402
from mistral_compile.weights import convert_weight  # noqa: E402

W = 16
TOL = 1e-4
EXPERTS = dict(num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module", params=["windowed", "full"])
def mixtral(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"mixtral_{request.param}")
    window = W if request.param == "windowed" else None
    return request.param, tiny_library(root, "MixtralForCausalLM", sliding_window=window,
                                       **EXPERTS), root


@pytest.mark.parametrize("kv", ["owned", "paged"])
@pytest.mark.parametrize("chunk", [W // 2 - 1, W, 2 * W], ids=["below", "equal", "above"])
@pytest.mark.parametrize("n", [1, W + 1, 3 * W + 5])
def test_mixtral_matches_hf_at_every_chunking(mixtral, n, chunk, kv):
    # prompts past the window, prefill in chunks below, at and above it, then greedy decoding
    name, ref, root = mixtral
    eng = Engine(root / "model", root / "lib.so", attention_sink_size=0, prefill_chunk_size=chunk,
                 kv_cache=kv)
    delta = compare(ref, eng, n)
    print(f"{name}: max |dlogit| {delta:.2e}")
    assert delta <= TOL


def test_mixtral_in_the_batched_runtime_equals_hf_alone(mixtral):
    # sequences joining and leaving: each one's logits are HF's for it alone
    _, ref, root = mixtral
    llm, seen = engine(root, max_batch_size=4, prefill_chunk_size=8, max_step_tokens=20)
    prompts = join_and_leave(llm)
    assert check_against_hf(ref, llm, seen, prompts, TOL) <= TOL


@pytest.mark.parametrize("mixtral", ["windowed"], indirect=True)
def test_generate_runs_a_mixtral_library_unchanged(mixtral, run_cli, tmp_path):
    # `mistral-compile generate` on a Mixtral library, prompts past the window, batched
    _, ref, root = mixtral
    rng = np.random.default_rng(3)
    lines = [{"id": i, "prompt_token_ids": rng.integers(3, 256, n).tolist(), "max_tokens": 6,
              "ignore_eos": True} for i, n in enumerate((1, W + 3, 3 * W))]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    done = run_cli("generate", root / "model", "--lib", root / "lib.so", "--input",
                   tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl",
                   "--prefill-chunk-size", "8")
    assert done.returncode == 0, done.stderr
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    for o, line in zip(out, lines, strict=True):
        tokens = list(line["prompt_token_ids"])
        with torch.no_grad():
            for _ in range(line["max_tokens"]):
                tokens.append(int(ref(torch.tensor([tokens])).logits[0, -1].argmax()))
        assert o["id"] == line["id"] and o["token_ids"] == tokens[len(line["prompt_token_ids"]):]


def test_the_routing_really_chooses(mixtral):
    # the experts matter: zeroing all but the first changes HF's logits, and our engine equals
    # HF routing to its top 2 while it differs from HF's model routing to all 4 experts on the
    # same weights; an engine that ignored the router (or the top k) could not pass
    _, ref, root = mixtral
    ids = np.random.default_rng(3).integers(3, 256, 9).tolist()
    changed = type(ref)(ref.config).eval()
    changed.load_state_dict(ref.state_dict())
    every = type(ref)(type(ref.config)(**{**ref.config.to_dict(),
                                          "num_experts_per_tok": EXPERTS["num_local_experts"]}))
    every.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for layer in changed.model.layers:
            layer.mlp.experts.down_proj[1:] = 0
        a = ref(torch.tensor([ids])).logits
        b = changed(torch.tensor([ids])).logits
        all_experts = every.eval()(torch.tensor([ids])).logits[0, -1].numpy()
    assert float((a - b).abs().max()) > 1e-2
    got = Engine(root / "model", root / "lib.so", attention_sink_size=0).prefill(ids)
    assert float(np.abs(got - a[0, -1].numpy()).max()) <= TOL
    assert float(np.abs(got - all_experts).max()) > 1e-2


def test_native_params_and_consolidated_experts(tmp_path):
    """params.json with a moe block + consolidated.safetensors (feed_forward.experts.E.w1...)."""
    from safetensors.numpy import save_file

    ref = tiny_library(tmp_path / "hf_side", "MixtralForCausalLM", sliding_window=W, **EXPERTS)
    cfg = ref.config
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    inter = cfg.intermediate_size
    native = native_tensors(sd, cfg)
    for i in range(cfg.num_hidden_layers):
        p, f = f"model.layers.{i}", f"layers.{i}.feed_forward"
        native[f"{f}.gate.weight"] = sd[f"{p}.mlp.gate.weight"]
        gate_up, down = sd[f"{p}.mlp.experts.gate_up_proj"], sd[f"{p}.mlp.experts.down_proj"]
        for e in range(cfg.num_local_experts):
            native.update({f"{f}.experts.{e}.w1.weight": gate_up[e, :inter],
                           f"{f}.experts.{e}.w3.weight": gate_up[e, inter:],
                           f"{f}.experts.{e}.w2.weight": down[e]})
    src = tmp_path / "native"
    src.mkdir()
    save_file(native, str(src / "consolidated.safetensors"))
    (src / "params.json").write_text(json.dumps({
        "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": inter, "n_heads": 4,
        "n_kv_heads": 2, "norm_eps": cfg.rms_norm_eps, "vocab_size": 256,
        "rope_theta": 10000.0, "sliding_window": W,
        "moe": {"num_experts": cfg.num_local_experts,
                "num_experts_per_tok": cfg.num_experts_per_tok}}))
    convert_weight(src, tmp_path / "model", "q0f32", progress=False)
    compile_model(tmp_path / "model", tmp_path / "lib.so")
    eng = Engine(tmp_path / "model", tmp_path / "lib.so", attention_sink_size=0)
    assert compare(ref, eng, W + 5) <= TOL


@pytest.mark.parametrize("quant", ["q4f16_1", "q4f16_2"])
def test_4_bit_experts_match_their_dequantized_weights(mixtral, tmp_path, quant):
    # each expert quantized as its own weight; the engine against HF on those very weights
    _, ref, root = mixtral
    convert_weight(root / "hf", tmp_path / quant, quant, progress=False)
    compile_model(tmp_path / quant, tmp_path / quant / "lib.so")
    manifest = json.loads((tmp_path / quant / "mistral-weights.json").read_text())
    shapes = {p["name"]: p["shape"] for p in manifest["params"]}
    cfg = ref.config
    assert shapes["model.layers.0.mlp.experts.gate_up_proj.q_weight"] == [
        cfg.num_local_experts, 2 * cfg.intermediate_size, cfg.hidden_size // 8]
    assert "model.layers.0.mlp.gate.weight" in shapes  # the router stays in float
    deq = _dequantized_reference(ref, tmp_path / quant)
    eng = Engine(tmp_path / quant, tmp_path / quant / "lib.so", attention_sink_size=0)
    ids = np.random.default_rng(5).integers(3, 256, W + 7).tolist()
    got = eng.prefill(ids)
    with torch.no_grad():
        want = deq(torch.tensor([ids])).logits[0, -1].numpy()
        full = ref(torch.tensor([ids])).logits[0, -1].numpy()
    err, drift = float(np.abs(got - want).max()), float(np.abs(got - full).max())
    print(f"{quant}: vs dequantized HF {err:.1e}, vs float HF {drift:.1e}")
    assert err <= 2e-3  # float16 experts against float32 HF on the same weights
    assert drift <= float(full.std())  # what 4 bits cost: below the spread of the logits


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("mixtral", ["windowed"], indirect=True)  # the window changes nothing
@pytest.mark.parametrize(("quant", "kernels"), [
    ("q0f16", ["mc::gemv_expert<half, half, 64, 4>", "mc::gemv_expert<half, float, 128, 0>"]),
    ("q4f16_1", ["mc::gemv_q4_expert<half, 64, 4, false>",
                 "mc::gemv_q4_expert<float, 128, 0, false>"])])
def test_cuda_decode_reads_only_the_chosen_experts(mixtral, tmp_path, quant, kernels):
    # one token's step: the router's top k on the device, then gate_up (silu) and down GEMVs
    # over the k chosen experts' rows of the stacked weights (grid y = expert slot); prefill
    # and batched steps: the (token, expert) pairs grouped by expert (moe_align, moe_gather),
    # grouped GEMMs on the tensor cores, each token's k rows summed (moe_combine). Checked
    # against HF on the H200 by tests/gpu/test_cuda.py::test_mixtral_matches_hf
    _, _, root = mixtral
    convert_weight(root / "hf", tmp_path / quant, quant, progress=False)
    code = f"""from mistral_compile.compiler.pipeline import compile_model
compile_model({str(tmp_path / quant)!r}, {str(tmp_path / "l.so")!r}, "cuda", "sm_90")"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "MISTRAL_COMPILE_DUMP_CUDA": str(tmp_path / "k.cu")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = (tmp_path / "k.cu").read_text()
    grouped = ["mc::moe_align<4>", "mc::moe_gather<64, 2>", "mc::gemm_wgmma<half, 64, 2>",
               "mc::gemm_wgmma<float, 128, 0>", "mc::moe_combine<half, 64, 2>"]
    for kernel in kernels + grouped:
        assert kernel in source, kernel
    # no expert left to TVM's schedules (the router's few rows are one of its matmuls)
    assert not [line for line in source.splitlines() if "matmul" in line and "experts" in line]
