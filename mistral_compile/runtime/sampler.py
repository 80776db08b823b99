"""The sampler of a batched step: each row's options up, ``sample`` on the device, ids back."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import tvm

from mistral_compile.abi import (
    NUM_OPTIONS,
    OPT_FREQUENCY,
    OPT_MIN_P,
    OPT_PRESENCE,
    OPT_REPETITION,
    OPT_TEMPERATURE,
    OPT_TOP_K,
    OPT_TOP_P,
)
from mistral_compile.runtime.artifact import Artifact
from mistral_compile.runtime.sampling import SamplingParams


def options_row(p: SamplingParams) -> list[float]:
    """A request's sampling options as the kernels' option columns."""
    row = [0.0] * NUM_OPTIONS
    row[OPT_TEMPERATURE], row[OPT_TOP_P], row[OPT_TOP_K] = p.temperature, p.top_p, p.top_k
    row[OPT_MIN_P], row[OPT_REPETITION] = p.min_p, p.repetition_penalty
    row[OPT_PRESENCE], row[OPT_FREQUENCY] = p.presence_penalty, p.frequency_penalty
    return row


def adjustments(p: SamplingParams, prompt: list[int],
                output: list[int]) -> list[tuple[int, int, int, float]]:
    """(token, generated count, seen, bias) for every token a request's penalties or bias touch.

    The repetition penalty (Hugging Face's) applies to tokens of the prompt and the output;
    presence and frequency penalties (OpenAI's) to generated tokens, by count.
    """
    counts = Counter(output) if (p.presence_penalty or p.frequency_penalty) else Counter()
    seen = set(prompt) | set(output) if p.repetition_penalty != 1.0 else set()
    tokens = set(counts) | seen | set(int(t) for t in p.logit_bias)
    return [(t, counts.get(t, 0), int(t in seen), float(p.logit_bias.get(t, 0.0)))
            for t in sorted(tokens)]


@dataclass
class SamplingState:
    """What the sampler needs of a sequence: its options, noise seed, prompt and answer so far."""

    params: SamplingParams
    seed: int
    prompt: list[int]
    output: list[int]


class Sampler:
    """Picks each row's next token from a step's logits on the device."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self.fn = artifact.vm["sample"]
        self.top = artifact.vm["top_logprobs"]
        self._buffers: dict[str, tvm.runtime.Tensor] = {}
        self._uploads = None
        if artifact.device.dlpack_device_type() == 2:  # kDLCUDA: queued, not synchronous
            from mistral_compile.runtime.library import HostUploads

            self._uploads = HostUploads(artifact.device.index)

    def _up(self, name: str, array: np.ndarray) -> tvm.runtime.Tensor:
        """``array`` in the device buffer kept for ``name`` (grown when too small).

        A fresh device array per draw costs an allocation and a free, and ``copyfrom`` waits
        for the stream: on CUDA the copy is queued instead (HostUploads), so the host can queue
        the draw and the next decode step while the current one runs.
        """
        array = np.ascontiguousarray(array)
        buf = self._buffers.get(name)
        if buf is None or int(buf.shape[0]) < array.size:
            size = max(64, 1 << (array.size - 1).bit_length())
            buf = tvm.runtime.empty((size,), str(array.dtype), self.artifact.device)
            self._buffers[name] = buf
        view = buf._create_view(array.shape)
        if self._uploads is not None:
            self._uploads.put(array, view)
        else:
            view.copyfrom(array)
        return view

    def launch(self, logits: tvm.runtime.Tensor, seqs: list) -> tuple:
        """Queue the draw: (token ids [rows] int32, their logprobs [rows]), on the device.

        ``seqs`` carry ``params``, ``seed``, ``prompt`` and ``output``; the noise of a token is
        keyed by (seed, index of the token in the output).
        """
        options = np.array([options_row(s.params) for s in seqs], dtype="float32")
        rng = np.array([[s.seed, len(s.output)] for s in seqs], dtype="int64")
        rng = rng.astype("uint32").view("int32")
        entries, bias = [(0, 0, 0, 0)], [0.0]  # a no-op entry: never an empty tensor
        for row, s in enumerate(seqs):
            for token, count, seen, b in adjustments(s.params, s.prompt, s.output):
                entries.append((row, token, count, seen))
                bias.append(b)
        return self.fn(logits, *self._up_all(
            options=options, rng=rng, entries=np.array(entries, dtype="int32"),
            bias=np.array(bias, dtype="float32")))

    def _up_all(self, **arrays: np.ndarray) -> list[tvm.runtime.Tensor]:
        """Each array in its device buffer (``_up``), queued as one batch of uploads."""
        if self._uploads is not None:
            self._uploads.begin()
        out = [self._up(name, array) for name, array in arrays.items()]
        if self._uploads is not None:
            self._uploads.end()
        return out

    def sample(self, logits: tvm.runtime.Tensor, seqs: list) -> tuple[np.ndarray, list | None]:
        """Token ids [rows] (numpy), and per row its logprob entry where one was asked for."""
        tokens, logprob = self.launch(logits, seqs)
        tokens = tokens.numpy()
        wanted = [s.params.logprobs for s in seqs if s.params.logprobs is not None]
        if not wanted:
            return tokens, None
        logprob = logprob.numpy()
        top_ids = top_values = None
        k = max(wanted)
        if k > 0:
            ids, values = self.top(logits, *self._up_all(k=np.array([k], dtype="int32")))
            top_ids, top_values = ids.numpy(), values.numpy()
        out = []
        for row, s in enumerate(seqs):
            n = s.params.logprobs
            if n is None:
                out.append(None)
                continue
            top = [] if not n else list(zip(top_ids[row, :n].tolist(),
                                            top_values[row, :n].tolist(), strict=True))
            out.append({"token": int(tokens[row]), "logprob": float(logprob[row]),
                        "top": top})
        return tokens, out
