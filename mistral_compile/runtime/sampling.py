"""Next-token sampling on host logits: repetition penalty, temperature, top-k, top-p (numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mistral_compile.errors import MistralCompileError

MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI's API allows


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; a seed makes sampling reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    max_tokens: int | None = None  # None = until EOS, the context or a stop string
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_p: float = 0.0  # 0 = off
    presence_penalty: float = 0.0  # OpenAI's: on tokens generated so far
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: also the top k (<= 20)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        """Plain argmax: the engine can pick tokens on the device (Engine.greedy)."""
        return (self.temperature == 0 and self.repetition_penalty == 1.0
                and not self.presence_penalty and not self.frequency_penalty
                and not self.logit_bias)

    def __post_init__(self) -> None:
        checks = (("temperature", self.temperature >= 0, ">= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                  ("max_tokens", self.max_tokens is None or self.max_tokens > 0, "> 0"),
                  ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
                  ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                   f"in [0, {MAX_LOGPROBS}]"))
        for name, ok, rule in checks:
            if not ok:
                raise MistralCompileError(f"{name}={getattr(self, name)}: must be {rule}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise MistralCompileError("stop strings must not be empty")


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int],
                             penalty: float) -> np.ndarray:
    """CTRL-style penalty: a seen token's logit is divided by it if positive, else multiplied."""
    if penalty == 1.0 or not len(history):
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(history, dtype=np.int64))
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def token_probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampled from (temperature > 0): softmax, then top-k, then top-p."""
    index, weight = _candidates(logits, params)
    if index is None:
        return weight / weight.sum()
    probs = np.zeros(logits.size)
    probs[index] = weight / weight.sum()
    return probs


def _candidates(logits: np.ndarray,
                params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """The tokens that may be drawn (None: all) and their unnormalised probabilities.

    Top-p keeps the smallest prefix of the tokens in descending probability (ties in index
    order) whose mass reaches top_p of the mass left after top-k. It sorts the values only
    (far cheaper than a stable index sort of the vocabulary): the cut's value v then gives
    every token above v and the first of v's ties in index order.
    """
    z = logits.astype(np.float64) / params.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    n = probs.size
    index = None
    if params.top_k and params.top_k < n:
        kth = np.partition(probs, n - params.top_k)[n - params.top_k]
        index = np.flatnonzero(probs >= kth)
    if params.top_p < 1.0:
        pool = probs if index is None else probs[index]
        values = np.sort(pool)[::-1]
        mass = np.cumsum(values)
        keep = min(int(np.searchsorted(mass, params.top_p * mass[-1])) + 1, values.size)
        cut = values[keep - 1]
        above = np.flatnonzero(pool > cut)
        chosen = np.concatenate([above, np.flatnonzero(pool == cut)[:keep - above.size]])
        index = chosen if index is None else index[chosen]
    return index, probs if index is None else probs[index]


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           history: Sequence[int] = ()) -> int:
    """One token id from float logits [vocab]."""
    if np.isnan(logits).any():
        raise MistralCompileError("the logits contain NaN: the model's activations overflowed "
                                  "(check the weights and the dtype)")
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(logits))
    index, weight = _candidates(logits, params)
    cdf = np.cumsum(weight)
    pick = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), cdf.size - 1)
    return pick if index is None else int(index[pick])
