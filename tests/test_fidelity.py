"""Engine vs Hugging Face MistralForCausalLM (eager, float32) on tiny random checkpoints."""

import json

import numpy as np
import pytest
import tvm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from reference import streaming_logits  # noqa: E402

from mistral_compile.compiler.pipeline import compile_model  # noqa: E402
from mistral_compile.errors import MistralCompileError  # noqa: E402
from mistral_compile.runtime import Engine  # noqa: E402
from mistral_compile.weights import convert_weight  # noqa: E402

W = 16
TOL = 1e-4
DECODE_STEPS = 32
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=512, rope_theta=10000.0)


def build(tmp_path_factory, name, cls, **cfg):
    torch.manual_seed(0)
    hf_cfg = getattr(transformers, cls.replace("ForCausalLM", "Config"))(
        **SHAPE, **cfg, attn_implementation="eager")
    ref = getattr(transformers, cls)(hf_cfg).eval()
    root = tmp_path_factory.mktemp(name)
    ref.save_pretrained(root / "hf")
    convert_weight(root / "hf", root / "model", "q0f32", progress=False)
    compile_model(root / "model", root / "lib.so")
    return ref, root


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    return build(tmp_path_factory, "windowed", "MistralForCausalLM", num_hidden_layers=2,
                 sliding_window=W)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return build(tmp_path_factory, "full", "MistralForCausalLM", num_hidden_layers=2,
                 sliding_window=None)


@pytest.fixture(scope="module")
def per_layer(tmp_path_factory):
    # head_dim given: transformers 5.23 Ministral itself crashes on head_dim=None
    return build(tmp_path_factory, "per_layer", "MinistralForCausalLM", num_hidden_layers=3,
                 head_dim=16,
                 sliding_window=W,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # Llama-architecture checkpoint: Mistral without a window (same tensor names and math)
    return build(tmp_path_factory, "llama", "LlamaForCausalLM", num_hidden_layers=2,
                 tie_word_embeddings=True)


def run_greedy(engine, ids):
    """Prefill ``ids`` into a fresh cache, then DECODE_STEPS greedy steps: (logits, tokens)."""
    engine.reset()
    got = [engine.prefill(ids)]
    seq = list(ids)
    for _ in range(DECODE_STEPS):
        seq.append(int(np.argmax(got[-1])))
        got.append(engine.decode(seq[-1]))
    return got, seq


def compare(ref, engine, prompt_len, seed=0):
    """Prefill, then greedy decode; max |Δlogit| over every compared position."""
    ids = np.random.default_rng(seed + prompt_len).integers(3, 256, prompt_len).tolist()
    got, seq = run_greedy(engine, ids)
    with torch.no_grad():
        want = ref(torch.tensor([seq])).logits[0].numpy()[prompt_len - 1:]
    assert [int(np.argmax(g)) for g in got] == [int(np.argmax(w)) for w in want]
    delta = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    print(f"prompt {prompt_len:3d}, chunk {engine.chunk_size:3d}: max|dlogit| {delta:.2e}")
    return delta


LENGTHS = [1, W - 1, W, W + 1, 3 * W + 5]


@pytest.mark.parametrize("kv", ["owned", "paged"])
@pytest.mark.parametrize("chunk", [W // 2 - 1, W, 2 * W], ids=["below", "equal", "above"])
@pytest.mark.parametrize("n", LENGTHS)
def test_sliding_window_matches_hf(windowed, n, chunk, kv):
    ref, root = windowed
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=0,
                    prefill_chunk_size=chunk, kv_cache=kv)
    assert engine.kv_cache == kv
    assert compare(ref, engine, n) <= TOL


@pytest.mark.parametrize("chunk", [W // 2 - 1, W - 1])
def test_owned_ring_wraps_inside_prefill(windowed, chunk):
    # the owned cache of a windowed model is a ring of W - 1 + chunk slots rounded up to 64:
    # 6W tokens of prompt go round it in prefill, then decode steps go round it again
    ref, root = windowed
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=0,
                    prefill_chunk_size=chunk)
    assert engine.kv_cache == "owned" and engine.capacity == 64
    assert compare(ref, engine, 6 * W + 3) <= TOL


def test_owned_rollback_on_the_ring(windowed):
    # dropping n tokens is possible while the window before the new end was not overwritten
    # (by them, or by a step queued ahead): n <= slots - W; the continuation then equals
    # Hugging Face's on the shorter sequence
    ref, root = windowed
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=0)
    ids = np.random.default_rng(9).integers(3, 256, 5 * W).tolist()
    engine.prefill(ids)
    limit = engine.capacity - W
    assert not engine.rollback(limit + 1) and engine.length == 5 * W
    assert engine.rollback(limit) and engine.length == 5 * W - limit
    kept = ids[:5 * W - limit]
    got = [engine.decode(t) for t in ids[5 * W - limit:5 * W - limit + 8]]
    with torch.no_grad():
        want = ref(torch.tensor([ids[:5 * W - limit + 8]])).logits[0].numpy()[len(kept):]
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)) <= TOL


def test_kv_cache_choice(windowed):
    _, root = windowed
    assert Engine(root / "model", root / "lib.so", attention_sink_size=4).kv_cache == "paged"
    with pytest.raises(MistralCompileError, match="kv_cache='owned' has no attention sinks"):
        Engine(root / "model", root / "lib.so", attention_sink_size=4, kv_cache="owned")
    with pytest.raises(MistralCompileError, match="kv_cache='ring': must be"):
        Engine(root / "model", root / "lib.so", kv_cache="ring")


def test_window_really_limits_attention(windowed, full):
    # same prompt through a windowed and an unwindowed model with identical weights differ
    ref, root = windowed
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=0)
    ids = np.random.default_rng(5).integers(3, 256, 3 * W).tolist()
    no_window = transformers.MistralForCausalLM(
        transformers.MistralConfig(**{**ref.config.to_dict(), "sliding_window": None})).eval()
    no_window.load_state_dict(ref.state_dict())
    with torch.no_grad():
        unwindowed = no_window(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(engine.prefill(ids) - unwindowed).max() > 1e-2


@pytest.mark.parametrize("kv", ["owned", "paged"])
@pytest.mark.parametrize("n", [1, 40, 3 * W + 5])
def test_no_window_matches_hf(full, n, kv):
    ref, root = full
    assert compare(ref, Engine(root / "model", root / "lib.so", kv_cache=kv), n) <= TOL


@pytest.mark.parametrize("n", [1, 3 * W + 5])
def test_llama_checkpoint_matches_hf(llama, n):
    ref, root = llama
    assert ref.config.model_type == "llama" and ref.config.tie_word_embeddings
    assert compare(ref, Engine(root / "model", root / "lib.so"), n) <= TOL


@pytest.mark.parametrize("n", [W - 1, W + 1, 3 * W + 5])
def test_per_layer_windows_match_hf(per_layer, n):
    ref, root = per_layer
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=0)
    assert compare(ref, engine, n) <= TOL


@pytest.mark.parametrize("fixture", ["windowed", "full"])
def test_device_greedy_matches_hf_generate(request, fixture):
    # Engine.greedy picks each token on the device and feeds it to the next step without the
    # host; the tokens must be Hugging Face's own greedy generation, through the window
    ref, root = request.getfixturevalue(fixture)
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=0)
    ids = np.random.default_rng(7).integers(3, 256, W + 3).tolist()
    steps = 3 * W
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                            min_new_tokens=steps)[0, len(ids):].tolist()
    got = engine.generate(ids, max_new_tokens=steps)
    assert got == want
    assert engine.tokens == ids + got[:-1]  # the last token is returned, not yet fed
    # and the device argmax equals the host's argmax of the same step's logits
    engine.reset()
    first = int(np.argmax(engine.prefill(ids)))
    device = engine.greedy(first)
    host = Engine(root / "model", root / "lib.so", attention_sink_size=0)
    logits = host.prefill(ids)
    token = first
    for _ in range(8):
        logits = host.decode(token)
        token = int(np.argmax(logits))
        assert next(device) == token


def test_decode_unpacks_weights_where_used(full):
    # the packed weights are unpacked next to their first use (compiler unpack_params_late),
    # so a decode step's first kernel is not queued behind one VM instruction per weight
    from tvm import relax

    _, root = full
    text = relax.VMExecutable(tvm.runtime.load_module(str(root / "lib.so"))).as_text()
    lines = text[text.index("@decode:"):].splitlines()[1:]
    packed = next(ln for ln in lines if "check_tuple_info" in ln).split("in: ")[1].split(",")[0]
    first_kernel = next(i for i, ln in enumerate(lines) if "vm.builtin" not in ln)
    unpacks = [i for i, ln in enumerate(lines) if f"tuple_getitem in: {packed}," in ln]
    assert len(unpacks) > 10  # 2 layers' weights
    assert sum(i < first_kernel for i in unpacks) == 1  # the embedding table only


def test_memory_bounded_by_window(windowed):
    # the cache holds W + chunk + 2 pages of token slots; 5W tokens must still run
    ref, root = windowed
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=0)
    capacity = engine.window + engine.chunk_size + 32
    assert capacity < 5 * W and engine.capacity < 5 * W
    assert compare(ref, engine, 5 * W - DECODE_STEPS) <= TOL


def test_native_checkpoint_with_interleaved_rope_layout(windowed, tmp_path):
    """params.json + consolidated.safetensors, wq/wk in Mistral's own (interleaved) order."""
    from conftest import native_tensors
    from safetensors.numpy import save_file

    ref, _ = windowed
    cfg = ref.config
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    native = native_tensors(sd, cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        native.update({f"layers.{i}.feed_forward.w1.weight": sd[f"{p}.mlp.gate_proj.weight"],
                       f"layers.{i}.feed_forward.w3.weight": sd[f"{p}.mlp.up_proj.weight"],
                       f"layers.{i}.feed_forward.w2.weight": sd[f"{p}.mlp.down_proj.weight"]})
    src = tmp_path / "native"
    src.mkdir()
    save_file(native, str(src / "consolidated.safetensors"))
    (src / "params.json").write_text(json.dumps({
        "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4,
        "n_kv_heads": 2, "norm_eps": cfg.rms_norm_eps, "vocab_size": 256,
        "rope_theta": 10000.0, "sliding_window": W}))
    convert_weight(src, tmp_path / "model", "q0f32", progress=False)
    compile_model(tmp_path / "model", tmp_path / "lib.so")
    engine = Engine(tmp_path / "model", tmp_path / "lib.so", attention_sink_size=0)
    assert compare(ref, engine, W + 1) <= TOL


def stream_compare(ref, engine, prompt_len, sink, seed=0):
    """Engine vs the float64 reference of our sink semantics, same chunking; max |Δlogit|."""
    ids = np.random.default_rng(seed + prompt_len).integers(3, 256, prompt_len).tolist()
    engine.reset()
    chunks = engine.prefill_chunks(prompt_len) + [1] * DECODE_STEPS
    got, seq = run_greedy(engine, ids)
    c = engine.chunk_size
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    want = streaming_logits(state, ref.config.to_dict(), seq, chunks, W, sink)[prompt_len - 1:]
    assert [int(np.argmax(g)) for g in got] == [int(np.argmax(w)) for w in want]
    delta = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    print(f"sink {sink}, prompt {prompt_len:3d}, chunk {c:3d}: max|dlogit| {delta:.2e}")
    return delta


def test_reference_without_sinks_is_hugging_face(windowed):
    # the float64 reference used for sinks, checked against transformers with sink 0
    ref, _ = windowed
    ids = np.random.default_rng(1).integers(3, 256, 3 * W + 5).tolist()
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    got = streaming_logits(state, ref.config.to_dict(), ids, [7] * 7 + [4], W, 0)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("chunk", [W // 2 - 1, W, 2 * W], ids=["below", "equal", "above"])
@pytest.mark.parametrize("n", LENGTHS)
def test_attention_sinks_match_reference(windowed, n, chunk):
    ref, root = windowed
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=4,
                    prefill_chunk_size=chunk)
    assert stream_compare(ref, engine, n, 4) <= TOL


def test_sinks_change_the_result_past_the_window(windowed):
    ref, root = windowed
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=4, prefill_chunk_size=7)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    ids = np.random.default_rng(2).integers(3, 256, 3 * W).tolist()
    chunks = engine.prefill_chunks(len(ids))
    with_sinks = streaming_logits(state, ref.config.to_dict(), ids, chunks, W, 4)[-1]
    without = streaming_logits(state, ref.config.to_dict(), ids, chunks, W, 0)[-1]
    assert np.abs(with_sinks - without).max() > 1e-2
    assert np.abs(engine.prefill(ids) - with_sinks).max() <= TOL


def test_memory_bounded_with_sinks(windowed):
    # W - 1 slots (4 sinks + the latest W - 5) + a chunk + 2 pages; 5W tokens must run
    ref, root = windowed
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=4)
    assert engine.window + engine.chunk_size + 32 < 5 * W
    assert stream_compare(ref, engine, 5 * W - DECODE_STEPS, 4) <= TOL


def test_library_for_another_config_is_refused(windowed, full):
    _, root_w = windowed
    _, root_f = full
    with pytest.raises(MistralCompileError, match="compiled for a different config"):
        Engine(root_w / "model", root_f / "lib.so")


def test_stale_library_says_why_without_loading_weights(windowed, full, monkeypatch):
    # what `make demo` asks before reusing a library it compiled earlier
    from mistral_compile.runtime import artifact

    _, root_w = windowed
    _, root_f = full
    assert artifact.stale_library(root_w / "model", root_w / "lib.so") is None
    assert "different config" in artifact.stale_library(root_w / "model", root_f / "lib.so")
    assert "not found" in artifact.stale_library(root_w / "model", root_w / "none.so")
    monkeypatch.setattr(artifact, "LIBRARY_FORMAT_VERSION", artifact.LIBRARY_FORMAT_VERSION + 1)
    assert "library format" in artifact.stale_library(root_w / "model", root_w / "lib.so")


def test_bad_tokens_and_context_overflow(windowed, full):
    _, root = windowed
    engine = Engine(root / "model", root / "lib.so", attention_sink_size=0)
    with pytest.raises(MistralCompileError, match="token id 256 is outside"):
        engine.prefill([1, 256])
    with pytest.raises(MistralCompileError, match="attention_sink_size=15: must be"):
        Engine(root / "model", root / "lib.so", attention_sink_size=15)
    _, root = full
    engine = Engine(root / "model", root / "lib.so")
    with pytest.raises(MistralCompileError, match="exceeds the context window"):
        engine.prefill([5] * 513)


def test_params_given_in_memory_equal_weight_files(windowed):
    # Engine(params=...) (used with random weights on the GPU) matches the converted files
    from mistral_compile.weights.mapping import HF, build_name_map

    ref, root = windowed
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = {name: np.concatenate([state[s] for s in spec.sources])
              for name, spec in build_name_map(Engine(root / "model", root / "lib.so").config,
                                               HF).items()}
    ids = np.random.default_rng(3).integers(3, 256, 20).tolist()
    from_files = Engine(root / "model", root / "lib.so", attention_sink_size=0)
    in_memory = Engine(root / "model", root / "lib.so", attention_sink_size=0, params=params)
    assert np.array_equal(from_files.prefill(ids), in_memory.prefill(ids))
    with pytest.raises(MistralCompileError, match="params: 'model.norm.weight' is float64"):
        Engine(root / "model", root / "lib.so",
               params={**params,
                       "model.norm.weight": params["model.norm.weight"].astype("float64")})
