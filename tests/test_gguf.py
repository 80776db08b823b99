"""GGUF input: tiny GGUF files written as llama.cpp writes them, read back against transformers."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf_fixture import LLAMA_CHAT, spm_vocab, write_gguf  # noqa: E402

from mistral_compile.compiler.pipeline import compile_model  # noqa: E402
from mistral_compile.config import load_source_config  # noqa: E402
from mistral_compile.errors import MistralCompileError  # noqa: E402
from mistral_compile.runtime import Engine  # noqa: E402
from mistral_compile.tokenizer.hf import HFTokenizer  # noqa: E402
from mistral_compile.weights import convert_weight  # noqa: E402
from mistral_compile.weights.safetensors_io import SafetensorsFile  # noqa: E402

TYPES = {"token_embd": "F16", "output.weight": "Q8_0", "blk.0.attn_q": "Q4_0",
         "blk.0.attn_k": "Q4_1", "blk.0.attn_v": "Q5_0", "blk.0.attn_output": "Q5_1",
         "blk.0.ffn_gate": "Q4_K", "blk.0.ffn_up": "Q5_K", "blk.0.ffn_down": "Q6_K",
         "blk.1.attn_q": "BF16", "blk.1.attn_k": "Q8_0"}
TEXTS = ["Hello world", " two  spaces and\nnew lines\n\n", "日本語 émigré 😀 ☃",
         "[INST] hi [/INST]", "numbers 12345 and 3.14159", ""]


def tiny_llama(**over):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**dict(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=32000, max_position_embeddings=256, rope_theta=10000.0,
        tie_word_embeddings=False, attn_implementation="eager"), **over})
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_f32")
    model = tiny_llama()
    write_gguf(model, root / "tiny-f32.gguf")
    convert_weight(root / "tiny-f32.gguf", root / "model", "q0f32", progress=False)
    compile_model(root / "model", root / "lib.so")
    return model, root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_mixed")
    write_gguf(tiny_llama(), root / "tiny-mixed.gguf", TYPES)
    convert_weight(root / "tiny-mixed.gguf", root / "model", "q0f32", progress=False)
    return root


def test_config_from_metadata(f32):
    model, root = f32
    cfg = load_source_config(root / "tiny-f32.gguf")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.vocab_size, cfg.context_window_size, cfg.sliding_window_size) == \
        (256, 4, 2, 64, 32000, 256, -1)
    assert not cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == pytest.approx(model.config.rms_norm_eps, rel=1e-6)


def test_f32_gguf_engine_matches_the_hf_model_it_came_from(f32):
    # the q/k rows went through llama.cpp's permutation and back: logits must be HF's
    model, root = f32
    engine = Engine(root / "model", root / "lib.so")
    ids = np.random.default_rng(1).integers(3, 32000, 24).tolist()
    got = [engine.prefill(ids)]
    seq = list(ids)
    for _ in range(8):
        seq.append(int(np.argmax(got[-1])))
        got.append(engine.decode(seq[-1]))
    with torch.no_grad():
        want = model(torch.tensor([seq])).logits[0].numpy()[len(ids) - 1:]
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)) < 1e-4


def test_tensor_types_equal_transformers_gguf_loader(mixed):
    pytest.importorskip("accelerate")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(mixed), gguf_file="tiny-mixed.gguf", dtype=torch.float32)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    manifest = json.loads((mixed / "model" / "mistral-weights.json").read_text())
    ours = {}
    for p in manifest["params"]:
        ours[p["name"]] = SafetensorsFile(mixed / "model" / p["file"]).get(p["name"])
    for i in range(2):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        qkv = np.concatenate([sd[f"{a}.{x}_proj.weight"] for x in "qkv"])
        np.testing.assert_array_equal(ours[f"{a}.qkv_proj.weight"], qkv)
        np.testing.assert_array_equal(ours[f"{a}.o_proj.weight"], sd[f"{a}.o_proj.weight"])
        gate_up = np.concatenate([sd[f"{p}.mlp.{x}_proj.weight"] for x in ("gate", "up")])
        np.testing.assert_array_equal(ours[f"{p}.mlp.gate_up_proj.weight"], gate_up)
        np.testing.assert_array_equal(ours[f"{p}.mlp.down_proj.weight"],
                                      sd[f"{p}.mlp.down_proj.weight"])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        np.testing.assert_array_equal(ours[name], sd[name])
    # and the quantized tensors really were quantized (not a silent float copy)
    reader = gguf.GGUFReader(mixed / "tiny-mixed.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.ffn_down.weight"] == "Q6_K" and kinds["blk.0.attn_k.weight"] == "Q4_1"


def test_sentencepiece_tokenizer_rebuilt_from_gguf(f32):
    _, root = f32
    sp = spm_vocab()[0]
    ours = HFTokenizer(root / "model")
    ref = transformers.AutoTokenizer.from_pretrained(str(root), gguf_file="tiny-f32.gguf")
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text)
        if not text.startswith(" "):  # transformers' Metaspace does not double a leading space
            assert ours.encode(text) == [1, *sp.encode(text)]
        ids = sp.encode(text)
        assert ours.decode(ids) == sp.decode(ids) == ref.decode(ids)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "日本?"}]
    assert ours.template.source == LLAMA_CHAT
    assert ours.encode_chat(messages) == list(ref.apply_chat_template(messages,
                                                                      return_dict=False))
    assert ours.eos_ids == {2} and ours.bos_id == 1
    # streaming: byte-fallback pieces of one character come out once the character is whole
    text = "naïve 龘 🦜 café ꙮ"  # none of these characters is a piece: byte fallback
    ids = ours.encode(text, add_special_tokens=False)
    assert any(ours.decode([i]).endswith("\ufffd") for i in ids)
    dec = ours.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == sp.decode(ids) == text and "\ufffd" not in "".join(pieces)


def _convert_error(tmp_path, gguf_path):
    out = tmp_path / "out"
    with pytest.raises(MistralCompileError) as info:
        convert_weight(gguf_path, out, "q0f32", progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    return str(info.value)


@pytest.mark.parametrize("meta, text", [
    ({"llama.embedding_length": None}, "field 'llama.embedding_length (hidden_size)': is "
     "required"),
    ({"llama.expert_count": 8}, "field 'llama.expert_count': is 8: mixture-of-experts"),
    ({"llama.rope.scaling.type": "yarn"}, "field 'llama.rope.scaling.type': is 'yarn'"),
    ({"llama.rope.dimension_count": 32}, "field 'llama.rope.dimension_count': is 32 but the "
     "heads are 64 wide: partial RoPE"),
])
def test_bad_metadata_is_one_line_naming_the_key(tmp_path, meta, text):
    path = write_gguf(tiny_llama(num_hidden_layers=1), tmp_path / "bad.gguf", **meta)
    message = _convert_error(tmp_path, path)
    assert message.startswith(str(path)) and text in message and "\n" not in message


def test_bad_files_are_one_line_errors(tmp_path):
    good = write_gguf(tiny_llama(num_hidden_layers=1), tmp_path / "good.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:100_000])
    assert "not a readable GGUF file" in _convert_error(tmp_path, truncated)
    other = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(other), "qwen2")
    writer.add_uint32("qwen2.block_count", 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "field 'general.architecture': 'qwen2' is not supported" in \
        _convert_error(tmp_path, other)
    iq = write_gguf(tiny_llama(num_hidden_layers=1), tmp_path / "iq.gguf",
                    {"blk.0.ffn_up": "IQ4_NL"})
    assert "tensor 'blk.0.ffn_up.weight' has type IQ4_NL, which is not supported" in \
        _convert_error(tmp_path, iq)


def test_q4_blocks_kept_as_they_are_in_q4f16_2(tmp_path):
    # GGUF Q4_0 / Q4_1 blocks are q4f16_2's form: imported without a second rounding, the
    # fused q/k/v (RoPE rows permuted) and gate/up included; other sources are rounded
    from mistral_compile.weights.quantize import dequantize

    types = {"blk.0.attn_q": "Q4_0", "blk.0.attn_k": "Q4_1", "blk.0.attn_v": "Q4_0",
             "blk.0.attn_output": "Q4_1", "blk.0.ffn_gate": "Q4_0", "blk.0.ffn_up": "Q4_1",
             "blk.0.ffn_down": "Q4_1", "output.weight": "Q4_1", "blk.1.attn_q": "Q8_0"}
    path = write_gguf(tiny_llama(), tmp_path / "q4.gguf", types)
    convert_weight(path, tmp_path / "f32", "q0f32", progress=False)
    convert_weight(path, tmp_path / "q4", "q4f16_2", progress=False)

    def tensors(model):
        manifest = json.loads((model / "mistral-weights.json").read_text())
        return {p["name"]: SafetensorsFile(model / p["file"]).get(p["name"])
                for p in manifest["params"]}

    dense, q4 = tensors(tmp_path / "f32"), tensors(tmp_path / "q4")

    def back(base):
        return dequantize(q4[base + "q_weight"], q4[base + "q_scale"], q4[base + "q_min"])

    for base in ("model.layers.0.self_attn.qkv_proj.", "model.layers.0.self_attn.o_proj.",
                 "model.layers.0.mlp.gate_up_proj.", "model.layers.0.mlp.down_proj.",
                 "lm_head."):
        np.testing.assert_array_equal(back(base), dense[base + "weight"])  # bit for bit
    rounded = "model.layers.1.self_attn.qkv_proj."  # q is Q8_0, k/v F32: rounded to 4 bits
    err = np.abs(back(rounded) - dense[rounded + "weight"])
    assert 0 < err.max() < 0.1 * np.abs(dense[rounded + "weight"]).max()
