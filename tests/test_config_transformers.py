"""The HF reader against config.json files that transformers itself writes (save_pretrained)."""

import json

import pytest

from mistral_compile.config import load_source_config

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("window", [16, None])
def test_mistral_config_written_by_transformers(tmp_path, window):
    ref = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                     num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                                     max_position_embeddings=512, sliding_window=window,
                                     head_dim=None, rope_theta=50000.0)
    ref.save_pretrained(tmp_path)
    cfg = load_source_config(tmp_path / "config.json")
    assert cfg.head_dim == ref.head_dim == 16
    assert cfg.num_key_value_heads == ref.num_key_value_heads
    assert cfg.rms_norm_eps == ref.rms_norm_eps
    saved = json.loads((tmp_path / "config.json").read_text())
    theta = saved.get("rope_theta") or saved["rope_parameters"]["rope_theta"]
    assert cfg.position_embedding_base == theta == 50000.0
    assert cfg.sliding_window_size == (window or -1)
    assert cfg.context_window_size == (-1 if window else 512)


def test_ministral_layer_types_written_by_transformers(tmp_path):
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    ref = transformers.MinistralConfig(hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       num_hidden_layers=3, vocab_size=256,
                                       max_position_embeddings=512, sliding_window=16,
                                       layer_types=types)
    ref.save_pretrained(tmp_path)
    cfg = load_source_config(tmp_path / "config.json")
    expected = [16 if t == "sliding_attention" else -1 for t in ref.layer_types]
    assert cfg.layer_sliding_window_sizes == expected
    assert cfg.context_window_size == 512


def test_llama_config_written_by_transformers(tmp_path):
    ref = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                                   max_position_embeddings=512, tie_word_embeddings=True)
    ref.save_pretrained(tmp_path)
    cfg = load_source_config(tmp_path / "config.json")
    assert cfg.sliding_window_size == -1 and cfg.context_window_size == 512
    assert cfg.tie_word_embeddings and cfg.head_dim == 16
