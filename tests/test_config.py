import json
import logging

import pytest
from conftest import CONFIGS

from mistral_compile.config import MistralConfig, from_hf, from_mistral_params, read_config
from mistral_compile.config.readers import config_to_json, write_config
from mistral_compile.errors import ConfigError, MistralCompileError


def hf(**over):
    base = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
            "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 4, "rms_norm_eps": 1e-5, "vocab_size": 100,
            "max_position_embeddings": 512, "rope_theta": 10000.0, "sliding_window": 16}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def params(**over):
    base = {"dim": 64, "n_layers": 4, "head_dim": 16, "hidden_dim": 128, "n_heads": 4,
            "n_kv_heads": 2, "norm_eps": 1e-5, "vocab_size": 100, "rope_theta": 1e6}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def test_window_on_means_unbounded_context_and_chunk_capped_by_window():
    cfg = from_hf(hf())
    assert cfg.sliding_window_size == 16
    assert cfg.layer_sliding_window_sizes == [16] * 4
    assert cfg.context_window_size == -1
    assert cfg.prefill_chunk_size == 16
    assert cfg.attention_sink_size == 4
    assert "sliding_window" not in cfg.kwargs  # consumed keys leave kwargs


@pytest.mark.parametrize("window", [None, -1, ...])
def test_window_null_minus_one_or_absent_disables_it(window, caplog):
    with caplog.at_level(logging.INFO, logger="mistral_compile.config"):
        cfg = from_hf(hf(sliding_window=window))
    assert cfg.sliding_window_size == -1
    assert cfg.layer_sliding_window_sizes == [-1] * 4
    assert cfg.context_window_size == 512
    assert cfg.prefill_chunk_size == 512
    assert cfg.attention_sink_size == 0  # sinks mean nothing without a window
    assert "context_window_size = 512 (from max_position_embeddings)" in caplog.text
    assert "sliding_window_size = -1" in caplog.text


def test_context_from_max_sequence_length_and_missing_context_is_an_error():
    cfg = from_hf(hf(sliding_window=None, max_position_embeddings=..., max_sequence_length=300))
    assert cfg.context_window_size == 300
    with pytest.raises(ConfigError, match="context_window_size.*cannot be derived"):
        from_hf(hf(sliding_window=None, max_position_embeddings=...))


def test_chunk_is_min_of_window_context_and_8192():
    assert from_hf(hf(sliding_window=None, max_position_embeddings=100000)).prefill_chunk_size \
        == 8192
    assert from_hf(hf(sliding_window=20000)).prefill_chunk_size == 8192
    assert from_hf(hf(), {"prefill_chunk_size": 7}).prefill_chunk_size == 7


@pytest.mark.parametrize("value", [None, ...])
def test_head_dim_null_or_absent_is_derived_and_logged(value, caplog):
    with caplog.at_level(logging.INFO, logger="mistral_compile.config"):
        cfg = from_hf(hf(head_dim=value))
    assert cfg.head_dim == 16
    assert caplog.text.count("head_dim = 16") == 1


def test_head_dim_given_is_kept_even_when_it_differs():
    cfg = from_hf(hf(hidden_size=80, head_dim=32))
    assert cfg.head_dim == 32 and cfg.hidden_size == 80


@pytest.mark.parametrize("field", ["head_dim", "num_key_value_heads", "prefill_chunk_size",
                                   "context_window_size", "sliding_window_size"])
def test_zero_is_an_error_not_a_request_to_derive(field):
    # only absent or null derive a value; a 0 given is a mistake (issue 17)
    with pytest.raises(ConfigError, match=f"field '{field}': is 0: give a positive value"):
        from_hf(hf(), {field: 0}) if field.endswith("_size") else from_hf(hf(**{field: 0}))


@pytest.mark.parametrize("field, value, text", [
    ("rms_norm_eps", float("nan"), "must be finite"),
    ("rms_norm_eps", float("inf"), "must be finite"),
    ("rope_theta", float("inf"), "NaN or infinite"),
    ("rope_theta", float("nan"), "NaN or infinite"),
    ("hidden_size", 10**40, "larger than any model"),
    ("num_key_value_heads", 10**40, "is 10000000000000000000000000000000000000000"),
])
def test_nan_inf_and_absurd_values_are_refused(field, value, text):
    with pytest.raises(ConfigError, match=text):
        from_hf(hf(**{field: value}))


@pytest.mark.parametrize("value", [None, ...])
def test_kv_heads_null_means_no_gqa(value):
    cfg = from_hf(hf(num_key_value_heads=value))
    assert cfg.num_key_value_heads == 4 and cfg.num_groups == 1


def test_rope_theta_sources(caplog):
    assert from_hf(hf(rope_theta=1e6)).position_embedding_base == 1e6
    # transformers 5 writes rope_parameters instead of rope_theta
    cfg = from_hf(hf(rope_theta=..., rope_parameters={"rope_type": "default",
                                                        "rope_theta": 5e5}))
    assert cfg.position_embedding_base == 5e5
    with caplog.at_level(logging.INFO, logger="mistral_compile.config"):
        assert from_hf(hf(rope_theta=None)).position_embedding_base == 10000.0
    assert "no rope_theta in the config" in caplog.text
    with pytest.raises(ConfigError, match="rope_scaling.*'yarn' is not supported"):
        from_hf(hf(rope_scaling={"type": "yarn", "factor": 4.0}))


def test_hf_layer_types_give_per_layer_windows_and_bounded_context():
    types = ["sliding_attention", "full_attention"] * 2
    cfg = from_hf(hf(model_type="ministral", architectures=["MinistralForCausalLM"],
                     layer_types=types))
    assert cfg.layer_sliding_window_sizes == [16, -1, 16, -1]
    assert cfg.sliding_window_size == 16
    assert cfg.context_window_size == 512  # full layers keep everything: context must be bounded
    with pytest.raises(ConfigError, match="context_window_size.*unbounded.*full"):
        from_hf(hf(layer_types=types), {"context_window_size": -1})
    with pytest.raises(ConfigError, match="layer_types.*one type per layer"):
        from_hf(hf(layer_types=types[:3]))
    with pytest.raises(ConfigError, match="unknown layer type 'chunked'"):
        from_hf(hf(layer_types=["chunked"] * 4))
    with pytest.raises(ConfigError, match="sliding_window.*null.*sliding_attention"):
        from_hf(hf(layer_types=types, sliding_window=None))


def test_params_per_layer_window_list():
    cfg = from_mistral_params(params(sliding_window=[8, None, 32, None], max_seq_len=1000))
    assert cfg.layer_sliding_window_sizes == [8, -1, 32, -1]
    assert cfg.sliding_window_size == 32
    assert cfg.context_window_size == 1000
    assert cfg.prefill_chunk_size == 32
    # sinks need every layer windowed: dropped (and logged) for a mixed model
    cfg = from_mistral_params(params(sliding_window=[8, None, 32, None], max_seq_len=1000),
                              {"attention_sink_size": 3})
    assert cfg.attention_sink_size == 0
    # the sinks and at least one recent token must fit in the smallest window
    with pytest.raises(ConfigError, match="attention_sink_size.*smaller than.*minus one .7."):
        from_mistral_params(params(sliding_window=[8, 32]), {"attention_sink_size": 7})
    assert from_mistral_params(params(sliding_window=[8, 32]),
                               {"attention_sink_size": 6}).attention_sink_size == 6


def test_params_window_pattern_repeats_over_layers(caplog):
    with caplog.at_level(logging.INFO, logger="mistral_compile.config"):
        cfg = from_mistral_params(params(sliding_window=[None, 16], max_seq_len=64))
    assert cfg.layer_sliding_window_sizes == [-1, 16, -1, 16]
    assert "repeats 2 times" in caplog.text
    with pytest.raises(ConfigError, match="sliding_window.*3 entries for 4 layers"):
        from_mistral_params(params(sliding_window=[16, 16, None], max_seq_len=64))


def test_params_keys_are_mapped_and_errors_use_native_names():
    cfg = from_mistral_params(params(sliding_window=4096))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (64, 4, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.position_embedding_base == 1e6 and cfg.rms_norm_eps == 1e-5
    with pytest.raises(ConfigError, match=r"field 'n_kv_heads \(num_key_value_heads\)'"):
        from_mistral_params(params(n_kv_heads=3, sliding_window=16))
    with pytest.raises(ConfigError, match=r"field 'dim \(hidden_size\)'.*missing"):
        from_mistral_params(params(dim=..., sliding_window=16))


def test_params_vision_is_refused():
    with pytest.raises(ConfigError, match="not supported yet"):
        from_mistral_params(params(vision_encoder={"num_experts": 8}))


def test_params_moe_block_gives_the_experts():
    cfg = from_mistral_params(params(moe={"num_experts": 8, "num_experts_per_tok": 2},
                                     sliding_window=16))
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.is_moe) == (8, 2, True)


@pytest.mark.parametrize("moe, text", [
    ([8, 2], "field 'moe': must be an object"),
    ({"num_experts": 8}, "field 'moe': has no 'num_experts_per_tok'"),
    ({"num_experts": 8, "num_experts_per_tok": 2, "capacity": 1}, "key 'capacity'"),
    ({"num_experts": 4, "num_experts_per_tok": 5},
     r"field 'moe.num_experts_per_tok \(num_experts_per_tok\)': is 5"),
])
def test_params_bad_moe_block_is_one_clear_error(moe, text):
    with pytest.raises(ConfigError, match=text):
        from_mistral_params(params(moe=moe, sliding_window=16))


@pytest.mark.parametrize("over, experts", [
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
      "num_local_experts": 4, "num_experts_per_tok": 1}, (4, 1)),
    # keys left out: transformers' MixtralConfig defaults, as transformers would build it
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, (8, 2)),
    ({"model_type": None, "architectures": ["MixtralForCausalLM"]}, (8, 2)),
])
def test_mixtral_is_read_with_its_experts(over, experts):
    cfg = from_hf(hf(**over))
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == experts and cfg.is_moe


@pytest.mark.parametrize("over, field, text", [
    ({"num_local_experts": 8}, "num_local_experts", "not a Mixtral"),  # a mistral: dense in HF
    ({"model_type": "mixtral", "num_local_experts": None}, "num_local_experts", "is null"),
    ({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 9},
     "num_experts_per_tok", "between 1 and"),
    ({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 0},
     "num_experts_per_tok", "between 1 and"),
    ({"model_type": "mixtral", "num_local_experts": 2.0}, "num_local_experts",
     "non-negative integer"),
])
def test_bad_experts_are_one_clear_error(over, field, text):
    with pytest.raises(ConfigError, match=f"field '{field}'.*{text}"):
        from_hf(hf(**over))


def test_dense_fingerprints_did_not_change_with_experts():
    # the expert fields are left out of a dense config's fingerprint, so every library and
    # converted model made before them still matches its config (value computed before them)
    from mistral_compile.config import load_source_config

    cfg = load_source_config(CONFIGS / "mistral-7b-v0.1.json")
    assert cfg.fingerprint() == "74850d7f6b499794c01f2eff2dea01c5c6b5ff9320794d65ae0c0eaa4c04de1e"
    moe = from_hf(hf(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2))
    dense = from_hf(hf())
    assert moe.fingerprint() != dense.fingerprint()


@pytest.mark.parametrize("over, field, text", [
    ({"hidden_size": "4096"}, "hidden_size", "must be an integer"),
    ({"hidden_size": 64.0}, "hidden_size", "must be an integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers", "must be an integer"),
    ({"vocab_size": ...}, "vocab_size", "missing"),
    ({"vocab_size": None}, "vocab_size", "missing"),
    ({"intermediate_size": -5}, "intermediate_size", "must be positive"),
    ({"num_hidden_layers": 0}, "num_hidden_layers", "must be positive"),
    ({"num_key_value_heads": 3}, "num_key_value_heads", "does not divide"),
    ({"hidden_size": 66, "head_dim": ...}, "head_dim", "not divisible"),
    ({"sliding_window": 0}, "sliding_window", "positive integers"),
    ({"sliding_window": "4096"}, "sliding_window", "positive integers"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps", "must be a number"),
    ({"rms_norm_eps": 0}, "rms_norm_eps", "must be positive"),
    ({"rope_theta": -1.0}, "rope_theta", "positive finite number"),
    ({"hidden_act": "gelu"}, "hidden_act", "not supported"),
    ({"model_type": "qwen2"}, "model_type", "'qwen2' is not supported"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "architectures", "not supported"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias", "biases are not"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias", "biases are not"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling", "'llama3' is not supported"),
    ({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling", "'linear' is not supported"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}},
     "rope_parameters", "'yarn' is not supported"),
    ({"model_type": ..., "architectures": ...}, "model_type", "missing"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings", "true or false"),
])
def test_bad_values_name_the_field(over, field, text):
    with pytest.raises(ConfigError) as info:
        from_hf(hf(**over))
    assert info.value.field == field
    assert text in str(info.value)
    assert f"'{field}'" in str(info.value)


@pytest.mark.parametrize("over, field", [
    ({"attention_sink_size": 16}, "attention_sink_size"),
    ({"attention_sink_size": -1}, "attention_sink_size"),
    ({"tensor_parallel_shards": 4}, "tensor_parallel_shards"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"prefill_chunk_size": -3}, "prefill_chunk_size"),
    ({"context_window_size": -7}, "context_window_size"),
    ({"sliding_window_size": -4}, "sliding_window_size"),
])
def test_bad_overrides_name_the_field(over, field):
    with pytest.raises(ConfigError) as info:
        from_hf(hf(), over)
    assert info.value.field == field


def test_overrides_take_part_in_derivation():
    cfg = from_hf(hf(sliding_window=None), {"sliding_window_size": 8})
    assert cfg.layer_sliding_window_sizes == [8] * 4
    assert cfg.context_window_size == -1 and cfg.prefill_chunk_size == 8
    cfg = from_hf(hf(), {"sliding_window_size": -1})
    assert cfg.sliding_window_size == -1 and cfg.context_window_size == 512
    types = ["sliding_attention", "full_attention"] * 2
    cfg = from_hf(hf(layer_types=types), {"sliding_window_size": 32})
    assert cfg.layer_sliding_window_sizes == [32, -1, 32, -1]
    assert from_hf(hf(), {"context_window_size": -1}).context_window_size == -1
    cfg = from_hf(hf(), {"context_window_size": 100, "attention_sink_size": 0,
                         "max_batch_size": 8})
    assert (cfg.context_window_size, cfg.attention_sink_size, cfg.max_batch_size) == (100, 0, 8)


def test_normalized_file_round_trips_without_new_fallbacks(tmp_path, caplog):
    cfg = from_mistral_params(params(sliding_window=[8, None, 32, None], max_seq_len=1000,
                                     custom_key="kept"))
    assert cfg.kwargs == {"custom_key": "kept"}
    path = write_config(cfg, tmp_path / "mistral-config.json")
    with caplog.at_level(logging.INFO, logger="mistral_compile.config"):
        again = read_config(tmp_path)
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    assert caplog.text == ""  # everything was settled already: no fallback fires twice
    doc = json.loads(path.read_text())
    assert doc["format_version"] == 1 and doc["config"]["layer_sliding_window_sizes"][1] == -1


def test_normalized_file_rejects_other_versions_edits_and_unknown_fields(tmp_path):
    cfg = from_hf(hf())
    doc = json.loads(config_to_json(cfg))
    path = tmp_path / "mistral-config.json"
    for change, text in [
        (lambda d: d.update(format_version=99), "format_version"),
        (lambda d: d.update(format="other"), "field 'format'"),
        (lambda d: d["config"].update(hidden_size=128), "fingerprint"),
        (lambda d: d["config"].update(bogus=1), "field 'bogus'"),
        (lambda d: d["config"].update(sliding_window_size=8), "sliding_window_size"),
    ]:
        bad = json.loads(json.dumps(doc))
        change(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(MistralCompileError, match=text) as info:
            read_config(path)
        assert str(path) in str(info.value)


def test_fingerprint_tracks_shape_not_kwargs():
    a = from_hf(hf(bos_token_id=1))
    assert a.fingerprint() == from_hf(hf(bos_token_id=5)).fingerprint()
    assert a.fingerprint() != from_hf(hf(sliding_window=32)).fingerprint()


def test_classmethod_readers_are_the_same_readers():
    assert MistralConfig.from_hf(hf()) == from_hf(hf())
    assert MistralConfig.from_mistral_params(params(sliding_window=16)) == \
        from_mistral_params(params(sliding_window=16))
