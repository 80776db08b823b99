"""Float64 numpy Mistral forward with our stated window/sink/RoPE semantics (docs/attention.md).

Independent of TVM and of transformers' attention code: it reads the HF state dict and applies,
per prefill chunk, the definition written in docs/attention.md:

* query i (absolute) sees key j iff j <= i and (j < sink or i - j < W - sink);
* a chunk that starts after L tokens uses shift = max(0, L - (W - 1)) (the tokens evicted so
  far): the query's RoPE position is i - shift, a recent key's is j - shift, a sink's is j.

With sink = 0 this is exactly Hugging Face's sliding window (the shift cancels in q.k).
"""

from __future__ import annotations

import numpy as np


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE; x [n, heads, d], pos [n]."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    half = d // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def streaming_logits(state: dict[str, np.ndarray], cfg: dict, ids: list[int],
                     chunks: list[int], window: int, sink: int) -> np.ndarray:
    """Logits [len(ids), vocab] (float64) for ids fed in chunks of the given sizes."""
    assert sum(chunks) == len(ids)
    sd = {k: v.astype(np.float64) for k, v in state.items()}
    n_layers, heads, kv_heads = (cfg["num_hidden_layers"], cfg["num_attention_heads"],
                                 cfg["num_key_value_heads"])
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    eps = cfg["rms_norm_eps"]
    theta = cfg["rope_parameters"]["rope_theta"] if "rope_parameters" in cfg else cfg["rope_theta"]
    keys = [np.zeros((0, kv_heads, hd)) for _ in range(n_layers)]  # un-rotated, all tokens
    values = [np.zeros((0, kv_heads, hd)) for _ in range(n_layers)]
    out, start = [], 0
    for size in chunks:
        pos = np.arange(start, start + size)
        shift = max(0, start - (window - 1))
        h = sd["model.embed_tokens.weight"][ids[start:start + size]]
        for li in range(n_layers):
            p = f"model.layers.{li}."
            a = _rms(h, sd[p + "input_layernorm.weight"], eps)
            q = (a @ sd[p + "self_attn.q_proj.weight"].T).reshape(size, heads, hd)
            keys[li] = np.concatenate(
                [keys[li], (a @ sd[p + "self_attn.k_proj.weight"].T).reshape(size, kv_heads, hd)])
            values[li] = np.concatenate(
                [values[li], (a @ sd[p + "self_attn.v_proj.weight"].T).reshape(size, kv_heads, hd)])
            j = np.arange(start + size)
            k_pos = np.where(j < sink, j, j - shift)
            k = _rope(keys[li], k_pos, theta)
            q = _rope(q, pos - shift, theta)
            group = heads // kv_heads
            k, v = np.repeat(k, group, axis=1), np.repeat(values[li], group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            visible = (j[None, :] <= pos[:, None]) & (
                (j[None, :] < sink) | (pos[:, None] - j[None, :] < window - sink))
            scores = np.where(visible[None], scores, -np.inf)
            prob = np.exp(scores - scores.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", prob, v).reshape(size, heads * hd)
            h = h + attn @ sd[p + "self_attn.o_proj.weight"].T
            m = _rms(h, sd[p + "post_attention_layernorm.weight"], eps)
            gate, up = m @ sd[p + "mlp.gate_proj.weight"].T, m @ sd[p + "mlp.up_proj.weight"].T
            h = h + (gate / (1 + np.exp(-gate)) * up) @ sd[p + "mlp.down_proj.weight"].T
        head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        out.append(_rms(h, sd["model.norm.weight"], eps) @ head.T)
        start += size
    return np.concatenate(out)
