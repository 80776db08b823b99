"""Numpy definition of the device sampler (model/sampler.py), written from the rules, by sorting.

* logit bias, then the repetition penalty (Hugging Face: a seen token's logit is divided by it if
  positive, else multiplied; seen = in the prompt or the output), then OpenAI's presence and
  frequency penalties (generated counts);
* temperature 0: the first largest logit;
* else probabilities softmax(x / T); top-k keeps every token at least as likely as the k-th;
  top-p (Hugging Face's rule) keeps a token when the mass of the kept tokens strictly more
  likely than it is below top_p of the kept mass; min-p keeps p >= min_p * p_max;
* the draw: the largest p_i / E_i over kept tokens, E_i = -log(u_i), u_i from the counter hash
  of (seed, step, i): an exponential race, which picks i with probability p_i / sum(kept p).
"""

from __future__ import annotations

import numpy as np

from mistral_compile.runtime.sampling import SamplingParams

M32 = 0xFFFFFFFF


def _fmix(h):
    h = h.astype(np.uint64) & M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    h ^= h >> 16
    return h


def exp_noise(seed: int, step: int, vocab: int) -> np.ndarray:
    v = np.arange(vocab, dtype=np.uint64)
    inner = _fmix((v * 0x9E3779B1 + 0x7F4A7C15) & M32)
    h = _fmix(np.uint64(seed) ^ _fmix(np.uint64(step) ^ inner))
    u = ((h >> 8).astype(np.float64) + 0.5) / 16777216.0
    return -np.log(u)


def adjusted(logits, p, prompt, output):
    x = logits.astype(np.float64).copy()
    for t, b in p.logit_bias.items():
        x[int(t)] += b
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    if p.presence_penalty or p.frequency_penalty:
        tokens, counts = np.unique(np.asarray(output, dtype=np.int64), return_counts=True)
        for t, c in zip(tokens, counts, strict=True):
            x[t] -= p.presence_penalty + p.frequency_penalty * c
    return x


def kept(x, p):
    """Boolean mask of the tokens that may be drawn, and their probabilities."""
    z = (x - x.max()) / p.temperature
    prob = np.exp(z)
    keep = np.ones(x.size, bool)
    if 0 < p.top_k < x.size:
        kth = np.sort(prob)[::-1][p.top_k - 1]
        keep &= prob >= kth
    if p.top_p < 1.0:
        mass = prob[keep].sum()
        order = np.sort(prob[keep])[::-1]
        above = np.concatenate([[0.0], np.cumsum(order)])  # mass strictly above each value
        greater = {}
        for value, before in zip(order, above[:-1], strict=True):
            greater.setdefault(value, before)
        keep &= np.array([k and greater[v] < p.top_p * mass for v, k in zip(prob, keep,
                                                                            strict=True)])
    if p.min_p > 0:
        keep &= prob >= p.min_p
    return keep, prob


def sample(logits, p, seed, prompt=(), output=()):
    x = adjusted(logits, p, list(prompt), list(output))
    if p.temperature == 0:
        return int(np.argmax(x))
    keep, prob = kept(x, p)
    score = np.where(keep & (prob > 0), prob / exp_noise(seed, len(output), x.size), -1.0)
    return int(np.argmax(score))


def logprobs(logits):
    x = logits.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


CASES = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7),
         SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=1.3, top_p=0.8),
         SamplingParams(temperature=0.9, top_k=40, top_p=0.9),
         SamplingParams(temperature=1.0, min_p=0.05),
         SamplingParams(temperature=2.0, top_p=0.5, min_p=0.1, top_k=100)]
