"""Tiny GGUF files written here as llama.cpp's convert_hf_to_gguf.py writes them (for tests)."""

import os

import numpy as np

LLAMA_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
              "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
              "{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def llama_cpp_permute(w, n_head, n_head_kv=None):
    """llama.cpp's q/k row order (interleaved RoPE pairs) from Hugging Face's rotate-half one."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def spm_vocab():
    """mistral-common's v1 SentencePiece model (Llama-2 / Mistral-7B-v0.1's vocabulary)."""
    import mistral_common
    import sentencepiece

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.get_piece_size())]
    return sp, pieces, scores, types


def _random_k_blocks(kind, rows, cols, rng):
    """Random K-quant blocks (the gguf package cannot quantize to them) with sane scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType[kind]
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if kind == "Q6_K":
        raw[..., size - 2:] = scale  # d at the end
    else:
        raw[..., 0:2] = scale  # d
        raw[..., 2:4] = scale  # dmin
    return raw.reshape(rows, -1), qtype


def write_gguf(model, path, types=None, tokenizer="spm", **meta):
    """Write a transformers Llama/Mistral model as a llama.cpp GGUF (architecture llama).

    ``types`` maps a GGUF tensor-name prefix (e.g. "blk.0.attn_q") to a ggml type name; the rest
    is F32. ``meta`` adds or overrides metadata (key -> value; None skips a key).
    """
    import gguf
    from gguf import GGMLQuantizationType

    cfg = model.config
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    fields = {
        "llama.context_length": (writer.add_uint32, cfg.max_position_embeddings),
        "llama.embedding_length": (writer.add_uint32, cfg.hidden_size),
        "llama.block_count": (writer.add_uint32, cfg.num_hidden_layers),
        "llama.feed_forward_length": (writer.add_uint32, cfg.intermediate_size),
        "llama.attention.head_count": (writer.add_uint32, heads),
        "llama.attention.head_count_kv": (writer.add_uint32, kv),
        "llama.rope.freq_base": (writer.add_float32, cfg.rope_parameters["rope_theta"]),
        "llama.attention.layer_norm_rms_epsilon": (writer.add_float32, cfg.rms_norm_eps),
        "llama.rope.dimension_count": (writer.add_uint32, cfg.head_dim),
        "llama.vocab_size": (writer.add_uint32, cfg.vocab_size),
    }
    for key, value in meta.items():
        if key in fields:
            fields[key] = (fields[key][0], value)
        elif value is not None:
            add = writer.add_string if isinstance(value, str) else writer.add_uint32
            fields[key] = (add, value)
    for key, (add, value) in fields.items():
        if value is not None:
            add(key, value)
    if tokenizer == "spm":
        _, pieces, scores, ttypes = spm_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(ttypes)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_chat_template(LLAMA_CHAT)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        names.update({f"{p}.self_attn.q_proj.weight": f"{b}.attn_q.weight",
                      f"{p}.self_attn.k_proj.weight": f"{b}.attn_k.weight",
                      f"{p}.self_attn.v_proj.weight": f"{b}.attn_v.weight",
                      f"{p}.self_attn.o_proj.weight": f"{b}.attn_output.weight",
                      f"{p}.mlp.gate_proj.weight": f"{b}.ffn_gate.weight",
                      f"{p}.mlp.up_proj.weight": f"{b}.ffn_up.weight",
                      f"{p}.mlp.down_proj.weight": f"{b}.ffn_down.weight",
                      f"{p}.input_layernorm.weight": f"{b}.attn_norm.weight",
                      f"{p}.post_attention_layernorm.weight": f"{b}.ffn_norm.weight"})
    for hf_name, w in sd.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names[hf_name]
        if name.endswith("attn_q.weight"):
            w = llama_cpp_permute(w, heads)
        elif name.endswith("attn_k.weight"):
            w = llama_cpp_permute(w, heads, kv)
        kind = next((t for prefix, t in (types or {}).items() if name.startswith(prefix)), "F32")
        if kind in ("Q4_K", "Q5_K", "Q6_K", "IQ4_NL"):
            raw, qtype = _random_k_blocks(kind, *w.shape, rng)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        elif kind == "F32":
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        else:
            qtype = GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
