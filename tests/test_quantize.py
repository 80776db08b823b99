"""4-bit formats: packing and scales against a plain-Python reference, a tiny model end to end."""

import numpy as np
import pytest

from mistral_compile.weights.quantize import dequantize, quantize, quantize_min, unpack_codes


def _reference(w):
    """Element by element, as weights/quantize.py's docstring states the format."""
    n, k = w.shape
    words = [[0] * (k // 8) for _ in range(n)]
    scales = np.zeros((n, k // 32), np.float16)
    for i in range(n):
        for g in range(k // 32):
            group = [float(v) for v in w[i, 32 * g:32 * g + 32]]
            scale = np.float16(max(abs(v) for v in group) / 7)
            scales[i, g] = scale
            for j, v in enumerate(group):
                q = 7 if scale == 0 else min(max(round(v / float(scale)), -7), 7) + 7
                col = 32 * g + j
                bit = 4 * (col % 8 // 2) + 16 * (col % 2)
                words[i][col // 8] |= q << bit
    return np.array(words, np.uint32), scales


def test_packing_and_scales_match_the_reference():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((5, 96)) * 0.05).astype(np.float32)
    w[1, 32:64] = 0  # an all-zero group: scale 0, codes 7, dequantized to 0
    w[2, 5] = 0.9  # an outlier sets its group's scale
    q_weight, q_scale = quantize(w)
    want_w, want_s = _reference(w)
    assert q_weight.dtype == np.uint32 and q_weight.shape == (5, 12)
    assert q_scale.dtype == np.float16 and q_scale.shape == (5, 3)
    np.testing.assert_array_equal(q_scale, want_s)
    np.testing.assert_array_equal(q_weight, want_w)
    back = dequantize(q_weight, q_scale)
    assert np.all(back[1, 32:64] == 0)
    # round-to-nearest: every element within half a step of its group's scale
    step = np.repeat(q_scale.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6 * np.abs(w).max())
    assert abs(back[2, 5] - 0.9) < 1e-3


def test_q4f16_2_minimum_and_scale_per_group():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 64)) * 0.05 + 0.02).astype(np.float32)  # not centred on 0
    w[3, :32] = 0.25  # a constant group: scale 0, every code 0, the value kept in the minimum
    q_weight, q_scale, q_min = quantize_min(w)
    assert q_weight.shape == (64, 8) and q_scale.shape == q_min.shape == (64, 2)
    codes = unpack_codes(q_weight).reshape(64, 2, 32)
    groups = w.reshape(64, 2, 32)
    # the minimum is the group's least value (in float16), code 0; the largest gets code 15
    np.testing.assert_array_equal(q_min, groups.min(-1).astype(np.float16))
    assert np.all(codes[4:].min(-1) == 0) and np.all(codes[4:].max(-1) == 15)
    back = dequantize(q_weight, q_scale, q_min)
    step = np.repeat(q_scale.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-3 * np.abs(w).max())
    assert np.all(back[3, :32] == np.float16(0.25))
    # 16 levels over [min, max] round finer than q4f16_1's 15 over [-max|w|, max|w|]
    sym = dequantize(*quantize(w))
    assert np.abs(back - w)[4:].mean() < 0.9 * np.abs(sym - w)[4:].mean()


def test_bad_input_width_is_refused():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize(np.zeros((2, 40), np.float32))


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from conftest import tiny_checkpoint

    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.weights import convert_weight

    root = tmp_path_factory.mktemp("q4")
    ref = tiny_checkpoint(root / "hf", attn_implementation="eager")
    for quant in ("q4f16_1", "q4f16_2", "q0f16"):
        convert_weight(root / "hf", root / quant, quant, progress=False)
        compile_model(root / quant, root / quant / "lib.so")
    return ref, root


def _dequantized_reference(ref, model_dir):
    """The HF model with every 4-bit weight replaced by its dequantized values.

    Dense MLPs and Mixtral's stacked experts (each expert dequantized as its own weight; the
    router stays float) alike.
    """
    import copy

    import torch

    from mistral_compile.weights.safetensors_io import SafetensorsFile

    tensors = {}
    for f in model_dir.glob("params_shard_*.safetensors"):
        sf = SafetensorsFile(f)
        tensors.update({k: sf.get(k) for k in sf.keys()})

    def deq(name):
        q, s, m = (tensors.get(f"{name}.{k}") for k in ("q_weight", "q_scale", "q_min"))
        if q.ndim == 3:  # stacked experts [E, rows, cols / 8]
            return torch.from_numpy(np.stack([dequantize(q[e], s[e], None if m is None else
                                                         m[e]) for e in range(q.shape[0])]))
        return torch.from_numpy(dequantize(q, s, m))

    model = copy.deepcopy(ref).float()
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    rows = [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd,
            cfg.num_key_value_heads * hd]
    state = {"lm_head.weight": deq("lm_head")}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = torch.split(deq(p + "self_attn.qkv_proj"), rows)
        state.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                      p + "self_attn.v_proj.weight": v,
                      p + "self_attn.o_proj.weight": deq(p + "self_attn.o_proj")})
        if p + "mlp.experts.gate_up_proj.q_weight" in tensors:  # Mixtral, transformers 5 names
            state.update({p + "mlp.experts.gate_up_proj": deq(p + "mlp.experts.gate_up_proj"),
                          p + "mlp.experts.down_proj": deq(p + "mlp.experts.down_proj")})
        else:
            gate, up = torch.chunk(deq(p + "mlp.gate_up_proj"), 2)
            state.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                          p + "mlp.down_proj.weight": deq(p + "mlp.down_proj")})
    assert not model.load_state_dict(state, strict=False).unexpected_keys
    return model


@pytest.mark.parametrize("quant", ["q4f16_1", "q4f16_2"])
def test_q4_model_matches_its_dequantized_weights(tiny_q4, quant):
    import json

    import torch

    from mistral_compile.runtime import Engine

    ref, root = tiny_q4
    manifest = json.loads((root / quant / "mistral-weights.json").read_text())
    assert manifest["quantization"] == quant
    assert {p["dtype"] for p in manifest["params"]} == {"uint32", "float16"}
    assert any(p["name"].endswith("q_min") for p in manifest["params"]) == (quant == "q4f16_2")
    deq = _dequantized_reference(ref, root / quant)
    ids = np.random.default_rng(3).integers(3, 256, 21).tolist()
    with torch.no_grad():
        want_deq = deq(torch.tensor([ids])).logits[0, -1].numpy()
        want_fp = ref(torch.tensor([ids])).logits[0, -1].numpy()
    got = {}
    for name in (quant, "q0f16"):
        eng = Engine(root / name, root / name / "lib.so", attention_sink_size=0)
        got[name] = eng.prefill(ids)
    noise16 = float(np.abs(got["q0f16"] - want_fp).max())  # float16 arithmetic alone
    err = float(np.abs(got[quant] - want_deq).max())  # the q4 path vs its own weights
    drift = float(np.abs(got[quant] - got["q0f16"]).max())  # what 4 bits cost
    spread = float(want_fp.std())
    print(f"{quant} vs dequantized HF {err:.1e} (fp16 engine vs HF {noise16:.1e}); "
          f"{quant} vs fp16 engine {drift:.1e}, logit std {spread:.1e}")
    assert err <= max(2 * noise16, 1e-3)
    assert drift <= 0.5 * spread
    # decode steps (on CPU: the q4 panel GEMV, not the prefill's dequantize + GEMM)
    eng = Engine(root / quant, root / quant / "lib.so", attention_sink_size=0)
    seq = list(ids)
    logits = eng.prefill(seq)
    for _ in range(4):
        seq.append(int(np.argmax(logits)))
        logits = eng.decode(seq[-1])
        with torch.no_grad():
            want = deq(torch.tensor([seq])).logits[0, -1].numpy()
        assert float(np.abs(logits - want).max()) <= max(2 * noise16, 1e-3)
