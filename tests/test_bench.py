"""bench: FLOP counting against a brute-force count, and a CPU run of the command."""

import json

import pytest

from mistral_compile.config import from_hf
from mistral_compile.runtime.bench import prefill_flops


def brute_force_flops(cfg, n):
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    total = 0
    for i in range(n):  # query at position i
        for w in cfg.layer_sliding_window_sizes:
            keys = i + 1 if w <= 0 else min(i + 1, w)
            total += 2 * h * (q + 2 * kv) * hd + 2 * q * hd * h + 6 * h * inter
            total += 4 * q * hd * keys
        total += 2 * h * cfg.vocab_size
    return total


@pytest.mark.parametrize("window, n", [(16, 40), (16, 10), (None, 33)])
def test_prefill_flops_formula(window, n):
    cfg = from_hf({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
                   "vocab_size": 100, "sliding_window": window,
                   "max_position_embeddings": 512, "rms_norm_eps": 1e-5})
    assert prefill_flops(cfg, n) == brute_force_flops(cfg, n)


def test_bench_runs_on_cpu_with_random_weights(run_cli, tmp_path):
    pytest.importorskip("torch")
    from conftest import CONFIGS

    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.config import convert_config

    convert_config(CONFIGS / "tiny-mistral.json", tmp_path / "m", {"attention_sink_size": 0})
    compile_model(tmp_path / "m", tmp_path / "lib.so", "cpu", quantization="q0f32")
    proc = run_cli("bench", tmp_path / "m", "--lib", tmp_path / "lib.so", "--device", "cpu",
                   "--random-weights", "--prefill-chunks", "8,15", "--contexts", "20,100",
                   "--decode-steps", "4", "--json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "b.json").read_text())
    assert [r["tokens"] for r in out["prefill"]] == [8, 15]
    assert [r["context"] for r in out["decode"]] == [20, 100]
    assert out["decode"][1]["cache_tokens_held"] < 100  # the window bounds the cache
    assert out["decode_sampled"]["context"] == 20 and out["decode_sampled"]["ms_per_token"] > 0
    assert out["copy_bandwidth_GBps"] > 0 and out["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
