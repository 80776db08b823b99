"""Sampling against a plain-python reference on fixed logits; stream decoding of real tokenizers."""

import math

import numpy as np
import pytest

from mistral_compile.errors import MistralCompileError
from mistral_compile.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    sample,
    token_probabilities,
)

LOGITS = np.array([2.0, -1.0, 0.5, 3.0, 0.0, -2.5, 1.5, 3.0], dtype=np.float32)


def reference(logits, temperature, top_k, top_p):
    """Written from the definitions, one token at a time."""
    exps = [math.exp(x / temperature) for x in logits]
    probs = [e / sum(exps) for e in exps]
    if top_k:
        kth = sorted(probs, reverse=True)[top_k - 1]
        probs = [p if p >= kth else 0.0 for p in probs]
    if top_p < 1:
        order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
        total, kept, mass = sum(probs), set(), 0.0
        for i in order:
            kept.add(i)
            mass += probs[i]
            if mass >= top_p * total:
                break
        probs = [p if i in kept else 0.0 for i, p in enumerate(probs)]
    return np.array(probs) / sum(probs)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (0.7, 4, 0.9), (2.0, 1, 1.0)])
def test_probabilities_match_reference(temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    got = token_probabilities(LOGITS, params)
    assert np.allclose(got, reference(LOGITS.tolist(), temperature, top_k, top_p), atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_probabilities_match_reference_on_large_vocabularies(seed):
    # top-p sorts values and takes the cut value's ties in index order: vocabularies of
    # hundreds of tokens, flat and peaky, with ties (rounded logits) at the cut
    rng = np.random.default_rng(seed)
    logits = np.round(rng.standard_normal(int(rng.integers(70, 700))) * rng.uniform(0.3, 6),
                      int(rng.integers(0, 3))).astype(np.float32)
    params = SamplingParams(temperature=float(rng.uniform(0.3, 1.5)),
                            top_p=float(rng.choice([0.5, 0.9, 0.99, 0.999])),
                            top_k=int(rng.choice([0, 0, 50, 300])))
    got = token_probabilities(logits, params)
    want = reference(logits.tolist(), params.temperature, params.top_k, params.top_p)
    assert np.array_equal(got > 0, want > 0)
    assert np.allclose(got, want, atol=1e-12)


def test_repetition_penalty_matches_definition():
    got = apply_repetition_penalty(LOGITS, [0, 1, 1, 5], 2.0)
    want = LOGITS.copy()
    want[0], want[1], want[5] = 2.0 / 2, -1.0 * 2, -2.5 * 2
    assert np.array_equal(got, want)
    # greedy with the penalty: token 3 (3.0) beats token 7 (3.0 -> 1.5 once seen)
    assert sample(LOGITS, SamplingParams(repetition_penalty=2.0), None, [7]) == 3


def test_greedy_and_seeded_sampling():
    rng = np.random.default_rng(0)
    assert sample(LOGITS, SamplingParams(), rng) == 3  # first of the tied maxima
    params = SamplingParams(temperature=1.0, top_k=3, seed=5)
    draws = [sample(LOGITS, params, np.random.default_rng(5)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same token
    counts = np.bincount([sample(LOGITS, params, rng) for _ in range(20000)], minlength=8)
    expected = reference(LOGITS.tolist(), 1.0, 3, 1.0)
    assert set(np.nonzero(counts)[0]) == set(np.nonzero(expected)[0])
    assert np.abs(counts / counts.sum() - expected).max() < 0.015


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 0), ("top_k", -2),
                                          ("repetition_penalty", 0), ("max_tokens", 0)])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(MistralCompileError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("name", ["tokenizer.model.v1",
                                  "mistral_instruct_tokenizer_240323.model.v3",
                                  "tekken_240911.json"])
def test_stream_decoder_reassembles_text(name):
    from pathlib import Path

    import mistral_common

    from mistral_compile.tokenizer.mistral import MistralCommonTokenizer

    tok = MistralCommonTokenizer.from_file(Path(mistral_common.__file__).parent / "data" / name)
    text = "Héllo wörld, 日本語 and emoji 🙂🙂 — spaces  kept"
    ids = tok.encode(text, add_special_tokens=False)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces) and sum(1 for p in pieces if p) > 5


def test_nan_logits_are_one_clear_error():
    logits = np.zeros(10, dtype=np.float32)
    logits[3] = np.nan
    with pytest.raises(MistralCompileError, match="logits contain NaN"):
        sample(logits, SamplingParams(temperature=0.7), np.random.default_rng(0))
