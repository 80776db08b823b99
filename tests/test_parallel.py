"""Tensor parallelism on CPUs: two shards in two processes (gloo) against one shard and HF."""

import multiprocessing
import socket

import numpy as np
import pytest

from mistral_compile.config import read_config
from mistral_compile.errors import MistralCompileError
from mistral_compile.model.parallel import local_config
from mistral_compile.weights.shard import shard_params

PROMPT = np.random.default_rng(4).integers(3, 256, 40).tolist()  # past the window of 16
STEPS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny windowed model (HF, converted, a 1-shard CPU library) and a 2-shard library."""
    from conftest import tiny_library

    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.weights import convert_weight

    root = tmp_path_factory.mktemp("parallel")
    hf = tiny_library(root)
    convert_weight(root / "hf", root / "two", "q0f32", progress=False,
                   overrides={"tensor_parallel_shards": 2})  # the whole model's weights
    compile_model(root / "two", root / "two" / "lib.so")
    return root, hf


def engine_logits(engine):
    """Logits of the prompt's last token, then of STEPS greedy steps after it."""
    got = [engine.prefill(PROMPT)]
    for _ in range(STEPS):
        got.append(engine.decode(int(np.argmax(got[-1]))))
    return np.stack(got)


def shard_worker(rank, root, port, out):
    """One shard's process: gloo, the all-reduce bound, its weights cut, the same steps."""
    import torch.distributed as dist

    from mistral_compile.runtime import Engine
    from mistral_compile.runtime.parallel import (
        register_all_reduce,
        shard_weights,
        torch_all_reduce,
    )

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        register_all_reduce(torch_all_reduce())
        config = read_config(root / "two")
        params = shard_weights(root / "two", config, rank)
        engine = Engine(root / "two", root / "two" / "lib.so", attention_sink_size=0,
                        params=params)
        out.put((rank, engine_logits(engine)))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_shards_in_two_processes_equal_one_shard_and_transformers(models):
    import torch

    from mistral_compile.runtime import Engine

    root, hf = models
    assert read_config(root / "two").tensor_parallel_shards == 2
    one = engine_logits(Engine(root / "model", root / "lib.so", attention_sink_size=0))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=shard_worker, args=(r, root, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    seq = list(PROMPT) + [int(np.argmax(x)) for x in one[:-1]]
    with torch.no_grad():
        want = hf(torch.tensor([seq])).logits[0, len(PROMPT) - 1:].float().numpy()
    for rank in range(2):  # both shards end with the same (replicated) logits
        assert np.abs(results[rank] - one).max() <= 1e-4
        assert np.abs(results[rank] - want).max() <= 1e-4
    assert np.abs(one - want).max() <= 1e-4


def test_the_cut_keeps_whole_heads_and_puts_the_model_back_together():
    # shard r's q, k and v rows are its heads' (of each segment alike), gate and up alike;
    # o and down are cut along their inputs: concatenating the shards gives the weights back
    from mistral_compile.config import MistralConfig

    cfg = MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8,
                        num_key_value_heads=4, num_hidden_layers=1, vocab_size=32,
                        rms_norm_eps=1e-5, head_dim=16, context_window_size=512,
                        tensor_parallel_shards=2)
    rng = np.random.default_rng(0)
    q, kv, i = 8 * 16, 4 * 16, 96
    full = {"model.layers.0.self_attn.qkv_proj.weight": rng.normal(size=(q + 2 * kv, 64)),
            "model.layers.0.self_attn.o_proj.weight": rng.normal(size=(64, q)),
            "model.layers.0.mlp.gate_up_proj.weight": rng.normal(size=(2 * i, 64)),
            "model.layers.0.mlp.down_proj.weight": rng.normal(size=(64, i)),
            "model.norm.weight": rng.normal(size=(64,))}
    shards = [shard_params(full, cfg, r) for r in range(2)]
    qkv = full["model.layers.0.self_attn.qkv_proj.weight"]
    mine = shards[1]["model.layers.0.self_attn.qkv_proj.weight"]
    # shard 1: q heads 4-7, k and v heads 2-3
    assert np.array_equal(mine[:q // 2], qkv[q // 2:q])
    assert np.array_equal(mine[q // 2:q // 2 + kv // 2], qkv[q + kv // 2:q + kv])
    assert np.array_equal(mine[q // 2 + kv // 2:], qkv[q + kv + kv // 2:])
    gate_up = full["model.layers.0.mlp.gate_up_proj.weight"]
    mine = shards[0]["model.layers.0.mlp.gate_up_proj.weight"]
    assert np.array_equal(mine, np.concatenate([gate_up[:i // 2], gate_up[i:i + i // 2]]))
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert np.array_equal(np.concatenate([s[name] for s in shards], axis=1), full[name])
    assert all(s["model.norm.weight"] is full["model.norm.weight"] for s in shards)
    local = local_config(cfg)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size,
            local.head_dim, local.hidden_size) == (4, 2, 48, 16, 64)


def test_what_the_shards_cannot_hold_is_refused_in_one_line(models, tmp_path):
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.config import convert_config

    root, _ = models
    convert_config(root / "hf" / "config.json", tmp_path / "m", {"tensor_parallel_shards": 2})
    # q4: a shard's o / down inputs must be whole groups of 32 (MLP 96: 48 columns a shard)
    convert_config(root / "hf" / "config.json", tmp_path / "m96",
                   {"tensor_parallel_shards": 2, "intermediate_size": 96})
    with pytest.raises(MistralCompileError, match="tensor_parallel_shards.*down_proj would take "
                                                  "48 input columns, not whole q4f16_1 groups"):
        compile_model(tmp_path / "m96", tmp_path / "l.so", quantization="q4f16_1")
    assert not (tmp_path / "l.so").exists()  # nothing half written


def test_convert_config_takes_the_shard_count(run_cli, models, tmp_path):
    root, _ = models
    proc = run_cli("convert-config", root / "hf", "-o", tmp_path / "m",
                   "--tensor-parallel-shards", "2")
    assert proc.returncode == 0, proc.stderr
    assert read_config(tmp_path / "m").tensor_parallel_shards == 2
    proc = run_cli("convert-config", root / "hf", "-o", tmp_path / "bad",
                   "--tensor-parallel-shards", "3")
    last = proc.stderr.strip().splitlines()[-1]  # after the log lines: one line, file and field
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "config.json: field 'tensor_parallel_shards': 3 does not divide" in last


def test_a_sharded_library_without_its_processes_is_one_clear_line(models):
    # loaded directly (Artifact) without its shards' processes, or with weights given
    from mistral_compile.runtime import Engine
    from mistral_compile.runtime.artifact import Artifact
    from mistral_compile.runtime.llm import LLM

    root, _ = models
    with pytest.raises(MistralCompileError, match="2 tensor-parallel shards runs in 2 processes"):
        Artifact(root / "two", root / "two" / "lib.so", params={})
    for make in (Engine, LLM):
        with pytest.raises(MistralCompileError, match="params cannot be given"):
            make(root / "two", root / "two" / "lib.so", params={})
    # a shard's weights are cut only from weights converted for the same model (any shard count)
    import dataclasses

    from mistral_compile.runtime.parallel import shard_weights

    other = dataclasses.replace(read_config(root / "two"), rms_norm_eps=1e-3, kwargs={})
    with pytest.raises(MistralCompileError, match="converted for a different config"):
        shard_weights(root / "model", other, 0)


def test_the_batched_runtime_on_two_shards_equals_one_shard(models):
    # LLM on a 2-shard library starts the second shard's process; each step the scheduler
    # makes (chunks and decode rows of several requests at once) runs on both shards' pages
    from mistral_compile.runtime.llm import LLM, EngineConfig
    from mistral_compile.runtime.sampling import SamplingParams

    root, _ = models
    settings = EngineConfig(max_batch_size=3, prefill_chunk_size=16)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 40, 23, 61)]
    params = [SamplingParams(max_tokens=10),
              SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=5)]
    sharded = LLM(root / "two", root / "two" / "lib.so", engine_config=settings)
    try:
        one = LLM(root / "model", root / "lib.so", engine_config=settings)
        for p in params:
            got = [o.token_ids for o in sharded.generate(prompts, p)]
            assert got == [o.token_ids for o in one.generate(prompts, p)]
    finally:
        sharded._shards.close()


def test_a_sharded_library_generates_as_one_shard_from_one_engine(models):
    # Engine on a 2-shard library starts the second shard's process itself (gloo) and runs
    # each chunk and step on both: generate, greedy and sampled, gives one shard's tokens
    from mistral_compile.runtime import Engine

    root, _ = models
    sharded = Engine(root / "two", root / "two" / "lib.so", attention_sink_size=0)
    one = Engine(root / "model", root / "lib.so", attention_sink_size=0)
    try:
        for options in ({"temperature": 0.0},
                        {"temperature": 0.9, "top_p": 0.9, "repetition_penalty": 1.2,
                         "seed": 3}):
            got = [sharded.generate(PROMPT, 12, **options) for _ in range(2)]  # reset between
            want = one.generate(PROMPT, 12, **options)
            assert got[0] == got[1] == want
        assert sharded.tokens == one.tokens
    finally:
        sharded._shards.close()
    from mistral_compile.runtime.parallel import all_reduce_bound

    assert not all_reduce_bound()  # closed: the group gone, the all-reduce unbound


def test_q4_shards_equal_one_q4_model(models):
    # q4f16_1 codes and scales cut as their weights are (o and down by whole groups of 32):
    # 2 shards give one q4 model's logits, to float16's rounding of each shard's partial sums
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.runtime import Engine
    from mistral_compile.weights import convert_weight

    root, _ = models
    for name, shards in (("q4-one", 1), ("q4-two", 2)):
        convert_weight(root / "hf", root / name, "q4f16_1", progress=False,
                       overrides={"tensor_parallel_shards": shards})
        compile_model(root / name, root / name / "lib.so")
    one = engine_logits(Engine(root / "q4-one", root / "q4-one" / "lib.so",
                               attention_sink_size=0))
    sharded = Engine(root / "q4-two", root / "q4-two" / "lib.so", attention_sink_size=0)
    try:
        two = engine_logits(sharded)
    finally:
        sharded._shards.close()
    print(f"q4 2 shards against 1: {np.abs(two - one).max():.2e} (logits up to "
          f"{np.abs(one).max():.2f})")
    assert np.abs(two - one).max() <= 2e-3


def test_bench_runs_a_sharded_model_on_random_weights(models):
    # --random-weights on a tensor-parallel model: each shard's process makes its own part
    # (RandomParams), as the driver cannot hand weights to other processes
    from mistral_compile.runtime.bench import RandomParams, make_random_weights, run_bench
    from mistral_compile.runtime.parallel import all_reduce_bound

    root, _ = models
    assert isinstance(make_random_weights(root / "two" / "lib.so", "cpu"),
                      RandomParams)
    result = run_bench(root / "two", root / "two" / "lib.so", "cpu", random_weights=True,
                       prefill_chunks=(16,), contexts=(32,), decode_steps=2, warmup=1,
                       repeats=1, copy_bytes=1 << 20, log=lambda _: None)
    assert result["tensor_parallel_shards"] == 2 and result["weights"] == "random"
    assert result["decode"][0]["ms_per_token"] > 0
    assert not all_reduce_bound()  # the shards were stopped with the bench


def test_weights_converted_once_serve_a_library_compiled_for_two_shards(run_cli, models):
    # MLC's flow: convert once, choose the shard count at compile. The count is the library's:
    # the Engine on the unsharded folder starts the second shard because the library says 2
    from mistral_compile.runtime import Engine

    root, _ = models
    lib = root / "model" / "tp2.so"
    proc = run_cli("compile", root / "model", "-o", lib, "--tensor-parallel-shards", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_config(root / "model").tensor_parallel_shards == 1
    one = engine_logits(Engine(root / "model", root / "lib.so", attention_sink_size=0))
    sharded = Engine(root / "model", lib, attention_sink_size=0)
    try:
        assert sharded.config.tensor_parallel_shards == 2 and sharded._shards is not None
        assert np.abs(engine_logits(sharded) - one).max() <= 1e-4
    finally:
        sharded.close()
    # a count the heads do not divide: one line, naming the flag, nothing written
    bad = run_cli("compile", root / "model", "-o", root / "model" / "tp3.so",
                  "--tensor-parallel-shards", "3")
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--tensor-parallel-shards 3" in last and not (root / "model" / "tp3.so").exists()
