"""Derived values for the published configs of real models kept in configs/."""

import pytest
from conftest import CONFIGS

from mistral_compile.config import load_source_config
from mistral_compile.errors import ConfigError

FULL = -1
# file: (window, context, chunk, head_dim, layers, kv heads, theta, sink, per-layer windows)
EXPECTED = {
    "mistral-7b-v0.1.json": (4096, -1, 4096, 128, 32, 8, 1e4, 4, [4096] * 32),
    "mistral-7b-instruct-v0.2.json": (-1, 32768, 8192, 128, 32, 8, 1e6, 0, [FULL] * 32),
    "mistral-7b-v0.3.json": (-1, 32768, 8192, 128, 32, 8, 1e6, 0, [FULL] * 32),
    "mistral-nemo-base-2407.json": (-1, 128000, 8192, 128, 40, 8, 1e6, 0, [FULL] * 40),
    "ministral-8b-instruct-2410.json": (32768, -1, 8192, 128, 36, 8, 1e8, 4, [32768] * 36),
    "codestral-22b-v0.1.json": (-1, 32768, 8192, 128, 56, 8, 1e6, 0, [FULL] * 56),
    "mistral-small-24b-base-2501.json": (-1, 32768, 8192, 128, 40, 8, 1e8, 0, [FULL] * 40),
    "mistral-large-instruct-2407.json": (-1, 131072, 8192, 128, 88, 8, 1e6, 0, [FULL] * 88),
    "params-mistral-7b-v0.1.json": (4096, -1, 4096, 128, 32, 8, 1e4, 4, [4096] * 32),
    "params-ministral-8b-instruct-2410.json":
        (32768, 32768, 8192, 128, 36, 8, 1e8, 0, [FULL, 32768, 32768, 32768] * 9),
    "params-per-layer-window.json": (32, 1024, 32, 16, 4, 2, 1e6, 0, [32, 32, 32, FULL]),
    "tiny-mistral.json": (16, -1, 16, 16, 2, 2, 1e4, 4, [16, 16]),
    "tiny-mistral-chat.json": (32, -1, 32, 16, 2, 2, 1e4, 4, [32, 32]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_derived_values(name):
    cfg = load_source_config(CONFIGS / name)
    window, context, chunk, head_dim, layers, kv, theta, sink, per_layer = EXPECTED[name]
    assert cfg.sliding_window_size == window
    assert cfg.context_window_size == context
    assert cfg.prefill_chunk_size == chunk
    assert cfg.head_dim == head_dim
    assert cfg.num_hidden_layers == layers
    assert cfg.num_key_value_heads == kv
    assert cfg.position_embedding_base == theta
    assert cfg.attention_sink_size == sink
    assert cfg.layer_sliding_window_sizes == per_layer


def test_nemo_head_dim_differs_from_hidden_over_heads():
    cfg = load_source_config(CONFIGS / "mistral-nemo-base-2407.json")
    assert cfg.hidden_size // cfg.num_attention_heads == 160
    assert cfg.head_dim == 128


@pytest.mark.parametrize("name", ["params-mistral-7b-instruct-v0.2.json",
                                  "params-mistral-7b-instruct-v0.3.json"])
def test_params_without_context_need_an_explicit_context(name):
    # these real params.json files carry neither a window nor a context length
    with pytest.raises(ConfigError, match="context_window_size.*--context-window-size"):
        load_source_config(CONFIGS / name)
    cfg = load_source_config(CONFIGS / name, {"context_window_size": 32768})
    assert (cfg.sliding_window_size, cfg.context_window_size, cfg.prefill_chunk_size) == \
        (-1, 32768, 8192)


X7B = (4096, 14336, 32, 32, 32768)  # hidden, MLP, layers, query heads, context
X22B = (6144, 16384, 56, 48, 65536)


@pytest.mark.parametrize("name, overrides, shape", [
    ("mixtral-8x7b-v0.1.json", {}, X7B), ("mixtral-8x7b-instruct-v0.1.json", {}, X7B),
    ("params-mixtral-8x7b-v0.1.json", {"context_window_size": 32768}, X7B),
    ("mixtral-8x22b-v0.1.json", {}, X22B)])
def test_mixtral_configs_give_its_experts(name, overrides, shape):
    # HF's num_local_experts / num_experts_per_tok and params.json's moe block
    cfg = load_source_config(CONFIGS / name, overrides)
    hidden, mlp, layers, heads, context = shape
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (hidden, mlp, layers)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (heads, 8, 128)
    assert (cfg.sliding_window_size, cfg.context_window_size) == (-1, context)
    assert cfg.position_embedding_base == 1e6
    assert "router_aux_loss_coef" in cfg.kwargs or name.startswith("params")  # training: unread


@pytest.mark.parametrize("name, text", [
    ("params-devstral-2-123b-instruct-2512.json", "not supported yet"),
])
def test_unsupported_real_configs_are_refused_with_the_file_named(name, text):
    with pytest.raises(ConfigError, match=text) as info:
        load_source_config(CONFIGS / name)
    assert name in str(info.value)


def test_params_aliases():
    from mistral_compile.config import from_mistral_params

    base = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4,
            "n_kv_heads": 2, "norm_eps": 1e-5, "vocab_size": 100}
    cfg = from_mistral_params({**base, "_sliding_window": 16, "tie_embeddings": True})
    assert cfg.sliding_window_size == 16 and cfg.tie_word_embeddings
    with pytest.raises(ConfigError, match="conflicts"):
        from_mistral_params({**base, "_sliding_window": 16, "sliding_window": 32})
    with pytest.raises(ConfigError, match="'mamba' is not supported"):
        from_mistral_params({**base, "model_type": "mamba"})
