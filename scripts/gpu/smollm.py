"""On the GPU machine: SmolLM2-135M-Instruct (real weights) on our CUDA libraries against HF.

Joins the GGUF carried in two halves (dist-smol-a/part, dist-smol-b/part; the first may have
been moved to /root/dist-smol-a by the call before), converts it for each library in
dist-gpu/smollm/<quantization>/ (the config there fixes the fingerprint), then for each:
greedy continuations of three chat prompts against transformers' own loading of the GGUF on
the same GPU (fp32, 32 argmax steps with its KV cache, through EOS), the first step's logits
against HF's, the chat answer to "What is the capital of France?", and greedy decode speed
(ours: Engine.greedy; HF: eager with its KV cache). Prints a table; JSON in $OUT/smollm.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# this folder holds profile.py, which would shadow the standard library's (torch imports it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

GGUF = Path("/tmp/smollm/SmolLM2-135M-Instruct.Q4_1.gguf")
STEPS = 32
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


def join_gguf() -> None:
    """The GGUF from its two carried halves."""
    GGUF.parent.mkdir(parents=True, exist_ok=True)
    parts = [next(p for p in (Path("/root/dist-smol-a/part"), REPO / "dist-smol-a" / "part")
                  if p.is_file()), REPO / "dist-smol-b" / "part"]
    GGUF.write_bytes(b"".join(p.read_bytes() for p in parts))


def hf_greedy(model: torch.nn.Module, ids: list[int]) -> tuple[list[int], np.ndarray, float]:
    """STEPS argmax steps; the first step's logits; seconds per decode step."""
    out, tokens, first = None, [], None
    with torch.no_grad():
        step = torch.tensor([ids], device="cuda")
        for i in range(STEPS):
            if i == 1:
                torch.cuda.synchronize()
                start = time.perf_counter()
            out = model(step, past_key_values=out.past_key_values if out else None,
                        use_cache=True)
            if first is None:
                first = out.logits[0, -1].float().cpu().numpy()
            tokens.append(int(out.logits[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]], device="cuda")
        torch.cuda.synchronize()
    return tokens, first, (time.perf_counter() - start) / (STEPS - 1)


def gguf_params(lib_dir: Path, quantization: str) -> dict[str, np.ndarray]:
    """The library's weights made from the GGUF in memory, as convert-weight makes them.

    (convert-weight itself builds the model to list its parameters, which needs TVM's compiler;
    this machine has TVM's runtime only.)
    """
    from mistral_compile.config import read_config
    from mistral_compile.weights.convert import (
        QUANTIZATIONS,
        _build_param,
        _locate,
        _stored_q4_blocks,
        find_checkpoint,
    )
    from mistral_compile.weights.mapping import GGUF as GGUF_FORMAT
    from mistral_compile.weights.mapping import build_name_map
    from mistral_compile.weights.quantize import Q4_FORMATS, quantizable, quantize_as

    config = read_config(lib_dir)
    where = _locate(find_checkpoint(GGUF).files)
    dtype = QUANTIZATIONS[quantization]
    params = {}
    for name, spec in build_name_map(config, GGUF_FORMAT).items():
        first = where[spec.sources[0]].shape(spec.sources[0])
        shape = (sum(spec.rows), *first[1:]) if spec.rows else first
        base = name.removesuffix("weight")
        if quantization in Q4_FORMATS and quantizable(shape) and "embed_tokens" not in name:
            values = (_stored_q4_blocks(name, spec, shape, where)
                      if quantization == "q4f16_2" else None) or quantize_as(
                quantization, _build_param(name, spec, shape, where, "float32"))
            params.update(zip((base + s for s in Q4_FORMATS[quantization]), values,
                              strict=True))
        else:
            params[name] = _build_param(name, spec, shape, where, dtype)
    return params


def main() -> None:
    """Convert, compare, time, print."""
    from mistral_compile.runtime import Engine
    from mistral_compile.tokenizer.gguf import write_gguf_tokenizer
    from mistral_compile.weights.gguf_io import GGUFFile

    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    join_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).cuda().eval()
    prompts = [list(tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False))
               for m in PROMPTS]
    ref = [hf_greedy(hf, ids) for ids in prompts]
    results = {"gpu": torch.cuda.get_device_name(), "hf_ms_per_token":
               1e3 * statistics.median(r[2] for r in ref), "ours": {}}
    print(f"{results['gpu']}; transformers {transformers.__version__} fp32 eager: "
          f"{results['hf_ms_per_token']:.2f} ms/token")
    for quant in ("q0f16", "q4f16_1", "q4f16_2"):
        lib_dir = REPO / "dist-gpu" / "smollm" / quant
        if not (lib_dir / "tokenizer.json").is_file():
            write_gguf_tokenizer(GGUFFile(GGUF), lib_dir)
        eng = Engine(lib_dir, lib_dir / "lib.so", device="cuda",
                     params=gguf_params(lib_dir, quant), tokenizer="hf")
        same, first_delta = [], []
        for ids, (want, logits, _) in zip(prompts, ref, strict=True):
            got = eng.generate(ids, STEPS)
            same.append(next((i for i, (a, b) in enumerate(zip(got, want, strict=True))
                              if a != b), STEPS))
            eng.reset()
            first_delta.append(float(np.abs(eng.prefill(ids) - logits).max()))
        eng.reset()
        first = int(np.argmax(eng.prefill(prompts[0])))
        steps = eng.greedy(first)
        next(steps)
        start = time.perf_counter()
        for _ in range(STEPS):
            next(steps)
        ms = 1e3 * (time.perf_counter() - start) / STEPS
        answer = "".join(eng.chat(PROMPTS[0], temperature=0, max_tokens=48))
        results["ours"][quant] = {"identical_prefix": same, "first_step_max_dlogit": first_delta,
                                  "ms_per_token": ms, "france": answer}
        print(f"{quant:8s}: greedy tokens equal to HF for {same} of {STEPS} steps; first-step "
              f"max|dlogit| {max(first_delta):.3f}; {ms:.2f} ms/token "
              f"({results['hf_ms_per_token'] / ms:.1f}x HF eager); France: {answer!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "smollm.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
