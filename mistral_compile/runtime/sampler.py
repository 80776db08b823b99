"""The sampler of a batched step: a token (and the logprobs asked for) per sequence."""

from __future__ import annotations

import numpy as np
import tvm

from mistral_compile.runtime.artifact import Artifact
from mistral_compile.runtime.sampling import sample


class Sampler:
    """Picks each row's next token from a step's logits."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact

    def sample(self, logits: tvm.runtime.Tensor, seqs: list) -> tuple[np.ndarray, list | None]:
        host = logits.numpy()
        out = np.zeros(len(seqs), dtype="int32")
        for i, seq in enumerate(seqs):
            p = seq.params
            rng = np.random.default_rng([p.seed or 0, len(seq.output)])
            out[i] = sample(host[i], p, rng, seq.tokens)
        return out, None
