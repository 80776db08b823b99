import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m mistral_compile ...` as a user would; returns CompletedProcess."""

    def run(*args, env=None, timeout=600, **kwargs):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([sys.executable, "-m", "mistral_compile", *map(str, args)],
                              capture_output=True, text=True, env=full_env, cwd=tmp_path,
                              timeout=timeout, **kwargs)

    return run


def tiny_checkpoint(path, cls="MistralForCausalLM", **overrides):
    """A random tiny checkpoint written by transformers itself (seed 0); returns the HF model.

    Default shape: hidden 64, 4 heads / 2 KV heads, 2 layers, vocab 256, window 16.
    """
    import torch
    import transformers

    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                 max_position_embeddings=512, sliding_window=16)
    torch.manual_seed(0)
    cfg = getattr(transformers, cls.replace("ForCausalLM", "Config"))(**{**shape, **overrides})
    model = getattr(transformers, cls)(cfg).eval()
    model.save_pretrained(path)
    return model


CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if tools %}{{ '<|im_start|>tools\\n' + tools | tojson + '<|im_end|>\\n' }}"
    "{% endif %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml_tokenizer(path, vocab_size=300, **config):
    """A byte-level BPE tokenizer trained here (deterministic) with ChatML tokens and template.

    Written as tokenizer.json + tokenizer_config.json, as a Hugging Face fine-tune ships it:
    <|im_end|> is both a special token and the EOS. ``config`` entries go to
    tokenizer_config.json (None deletes a key).
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The capital of France is Paris.", "Hello, world! How are you today?",
              "Sliding windows keep the cache small.", "日本語のテキスト, émigré café, naïve"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 3, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
           "pad_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE,
           "tokenizer_class": "GPT2Tokenizer", "model_max_length": 2048, **config}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


def tiny_library(root, cls="MistralForCausalLM", quantization="q0f32", **overrides):
    """A tiny HF checkpoint (eager attention), converted and compiled for the CPU under ``root``.

    Returns the HF model; the converted model is ``root / "model"``, the library
    ``root / "lib.so"``. Default shape as tiny_checkpoint, rope_theta 10000.
    """
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.weights import convert_weight

    model = tiny_checkpoint(root / "hf", cls, rope_theta=10000.0, attn_implementation="eager",
                            **overrides)
    convert_weight(root / "hf", root / "model", quantization, progress=False)
    compile_model(root / "model", root / "lib.so")
    return model


def _interleave(w, heads):
    """HF's rotate-half q/k rows back into Mistral's own interleaved RoPE order."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def native_tensors(sd, cfg):
    """An HF state dict's embedding, head, norms and attention under Mistral-native names.

    ``sd``: name -> numpy array; ``cfg``: the HF config. The MLP (dense or experts) is the
    caller's to add.
    """
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out.update({
            f"layers.{i}.attention.wq.weight": _interleave(sd[f"{p}.self_attn.q_proj.weight"],
                                                           cfg.num_attention_heads),
            f"layers.{i}.attention.wk.weight": _interleave(sd[f"{p}.self_attn.k_proj.weight"],
                                                           cfg.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[f"{p}.self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[f"{p}.self_attn.o_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[f"{p}.input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[f"{p}.post_attention_layernorm.weight"]})
    return out
