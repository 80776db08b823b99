"""The device sampler (model/sampler.py, CPU build) against the numpy definition."""

import re
from pathlib import Path

import numpy as np
import pytest
import sampling_reference as ref
import tvm

from mistral_compile import abi
from mistral_compile.compiler.pipeline import compile_model
from mistral_compile.model import sampler as kernels
from mistral_compile.runtime.sampler import adjustments, options_row
from mistral_compile.runtime.sampling import SamplingParams
from mistral_compile.weights import convert_weight

VOCAB = 256


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    from conftest import tiny_checkpoint

    root = tmp_path_factory.mktemp("sampler")
    tiny_checkpoint(root / "hf")
    convert_weight(root / "hf", root / "model", "q0f32", progress=False)
    compile_model(root / "model", root / "lib.so")
    lib = tvm.runtime.load_module(str(root / "lib.so"))
    return tvm.relax.VirtualMachine(lib, tvm.cpu())


def run(vm, logits, params, seeds, histories=None):
    """The device's tokens and logprobs for rows of logits, one request each."""
    histories = histories or [((), ())] * len(params)
    options = np.array([options_row(p) for p in params], dtype="float32")
    rng = np.array([[s, len(h[1])] for s, h in zip(seeds, histories, strict=True)],
                   dtype="int64").astype("uint32").view("int32")
    entries, bias = [(0, 0, 0, 0)], [0.0]
    for row, (p, (prompt, output)) in enumerate(zip(params, histories, strict=True)):
        for token, count, seen, b in adjustments(p, list(prompt), list(output)):
            entries.append((row, token, count, seen))
            bias.append(b)
    up = tvm.runtime.tensor
    tokens, logprob = vm["sample"](up(logits.astype("float32")), up(options), up(rng),
                                   up(np.array(entries, dtype="int32")),
                                   up(np.array(bias, dtype="float32")))
    return tokens.numpy(), logprob.numpy()


CASES = ref.CASES


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"t{p.temperature}-k{p.top_k}-"
                                                       f"p{p.top_p}-m{p.min_p}")
def test_tokens_equal_the_numpy_definition(vm, params):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (48, VOCAB))
    seeds = rng.integers(0, 2**32, 48).tolist()
    got, logprob = run(vm, logits, [params] * 48, seeds)
    want = [ref.sample(row, params, s) for row, s in zip(logits, seeds, strict=True)]
    assert got.tolist() == want
    lp = [ref.logprobs(row)[t] for row, t in zip(logits, want, strict=True)]
    np.testing.assert_allclose(logprob, lp, atol=1e-4)
    if params.temperature > 0:  # a sampler, not an argmax
        assert got.tolist() != np.argmax(logits, -1).tolist()


def test_penalties_and_bias_equal_the_numpy_definition(vm):
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (6, VOCAB))
    params = [SamplingParams(repetition_penalty=1.3),
              SamplingParams(presence_penalty=1.5, frequency_penalty=0.7),
              SamplingParams(logit_bias={7: 100.0}),
              SamplingParams(temperature=0.8, repetition_penalty=0.7, frequency_penalty=-1.0),
              SamplingParams(temperature=1.0, logit_bias={3: -100.0, 9: 5.0}, top_k=3),
              SamplingParams(temperature=0.5, presence_penalty=2.0, top_p=0.7)]
    histories = [(rng.integers(0, VOCAB, 30).tolist(), rng.integers(0, VOCAB, n).tolist())
                 for n in (5, 40, 0, 12, 3, 25)]
    # the best raw tokens of rows 0 and 1 in their history: the penalties must move them
    histories[0][0].append(int(np.argmax(logits[0])))
    histories[1][1].extend([int(np.argmax(logits[1]))] * 3)
    seeds = [11, 12, 13, 14, 15, 16]
    got, _ = run(vm, logits, params, seeds, histories)
    want = [ref.sample(row, p, s, *h) for row, p, s, h in zip(logits, params, seeds, histories,
                                                              strict=True)]
    assert got.tolist() == want
    assert got[2] == 7
    # the penalties change what greedy picks: without them the argmax of the raw logits
    assert got[0] != np.argmax(logits[0]) and got[1] != np.argmax(logits[1])


def test_a_seeded_row_draws_the_same_token_in_any_batch(vm):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (16, VOCAB))
    params = SamplingParams(temperature=1.0, top_p=0.95)
    alone = [run(vm, logits[i:i + 1], [params], [1234])[0][0] for i in range(16)]
    together, _ = run(vm, logits, [params] * 16, [1234] * 16)
    assert together.tolist() == alone
    shuffled = rng.permutation(16)
    again, _ = run(vm, logits[shuffled], [params] * 16, [1234] * 16)
    assert again.tolist() == [alone[i] for i in shuffled]


def test_the_draws_follow_the_kept_distribution():
    # the definition itself (numpy): over many (seed, step) keys, frequencies match the
    # renormalised probabilities of the kept tokens
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    params = SamplingParams(temperature=1.0, top_p=0.8)
    keep, prob = ref.kept(logits, params)
    assert keep.tolist() == [True, True, True, False, False, False]
    n = 20000
    counts = np.bincount([ref.sample(logits, params, seed) for seed in range(n)], minlength=6)
    want = np.where(keep, prob, 0) / prob[keep].sum()
    assert np.abs(counts / n - want).max() < 0.015


def test_top_logprobs(vm):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (5, VOCAB)).astype("float32")
    ids, values = vm["top_logprobs"](tvm.runtime.tensor(logits),
                                     tvm.runtime.tensor(np.array([7], dtype="int32")))
    ids, values = ids.numpy(), values.numpy()
    for row in range(5):
        lp = ref.logprobs(logits[row])
        order = np.argsort(-lp, kind="stable")[:7]
        assert ids[row, :7].tolist() == order.tolist()
        np.testing.assert_allclose(values[row, :7], lp[order], atol=1e-4)
        assert (ids[row, 7:] == 0).all()


def test_option_columns_are_the_kernels():
    header = (Path(kernels.__file__).parent.parent / "compiler" / "csrc" /
              "mc_kernels.cuh").read_text()
    for name in ("TEMPERATURE", "TOP_P", "TOP_K", "MIN_P", "REPETITION", "PRESENCE",
                 "FREQUENCY"):
        value = re.search(rf"OPT_{name} = (\d+)", header).group(1)
        assert int(value) == getattr(abi, f"OPT_{name}")
    assert int(re.search(r"NUM_OPTIONS = (\d+)", header).group(1)) == abi.NUM_OPTIONS
    assert int(re.search(r"SAMPLE_THREADS = (\d+)", header).group(1)) == \
        kernels.SAMPLE_THREADS


def test_the_sampler_keeps_its_device_buffers_and_draws_as_with_fresh_arrays(vm):
    # Sampler uploads each draw's inputs into one device buffer per input, grown when a draw
    # has more adjustments: a fresh device array per draw costs an allocation and a
    # synchronising free
    from types import SimpleNamespace

    from mistral_compile.runtime.sampler import Sampler, SamplingState

    sampler = Sampler(SimpleNamespace(vm=vm, device=tvm.cpu()))
    rng = np.random.default_rng(5)
    params = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.3,
                            presence_penalty=0.4, logprobs=2)
    sizes = []
    for prompt_len in (3, 200, 1, 120):  # the adjustments grow, shrink, grow again
        logits = rng.normal(0, 3, (2, VOCAB))
        seqs = [SamplingState(params, 11, rng.integers(0, VOCAB, prompt_len).tolist(),
                              rng.integers(0, VOCAB, 7).tolist()) for _ in range(2)]
        got, entries = sampler.sample(tvm.runtime.tensor(logits.astype("float32")), seqs)
        want, logprob = run(vm, logits, [params] * 2, [11, 11],
                            [(s.prompt, s.output) for s in seqs])
        assert got.tolist() == want.tolist()
        assert [e["logprob"] for e in entries] == pytest.approx(logprob.tolist())
        sizes.append(int(sampler._buffers["entries"].shape[0]))
    assert sizes[0] < sizes[1] == sizes[2] == sizes[3]  # grown once, then reused
    assert set(sampler._buffers) == {"options", "rng", "entries", "bias", "k"}
