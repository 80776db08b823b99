"""Text output is a function of the tokens: streamed pieces, final text and end all agree."""

import numpy as np
import pytest
from conftest import chatml_tokenizer

from mistral_compile.runtime.output import StopRule, TextOutput, render
from mistral_compile.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    chatml_tokenizer(path)
    return load_tokenizer(path, {"family": "hf"}, 300)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_equals_render(tokenizer, seed):
    rng = np.random.default_rng(seed)
    eos = frozenset(tokenizer.eos_ids)
    tokens = rng.integers(0, 300, 60).tolist()
    full = tokenizer.decode([t for t in tokens if t not in eos])
    stop = full[20:23] if seed % 2 and len(full) > 25 else None
    rule = StopRule(eos, (stop,) if stop and stop.strip() else (), max_tokens=40 + seed,
                    ignore_eos=seed == 4)
    out = TextOutput(5, rule, tokenizer)
    pieces = []
    for t in tokens:
        pieces.append(out.push(t))
        if out.finish_reason:
            break
    text, kept, reason = render(tokens, 5, rule, tokenizer)
    assert (out.text, out.tokens, out.finish_reason) == (text, kept, reason)
    assert "".join(pieces) == text  # what streamed is the text, stop strings never leaked
    assert reason in ("stop", "length")
    if reason == "length" and not (set(kept) & eos and not rule.ignore_eos):
        assert text == tokenizer.decode(kept)  # incomplete bytes flushed at the end


def test_the_context_ends_a_sequence(tokenizer):
    rule = StopRule(frozenset(), (), None, max_length=10)
    text, kept, reason = render(list(range(40, 60)), 7, rule, tokenizer)
    assert (len(kept), reason) == (3, "length")
