"""Peer baseline: Hugging Face transformers batch-1 decode on the same shape, dtype and GPU.

Usage (on the GPU machine): python benchmarks/hf_baseline.py [--config configs/mistral-7b-v0.1.json]
    [--contexts 1024,4096] [--steps 32] [--no-compile] [--batches 8,32,64] [--json FILE]
Measures, with random fp16 weights: eager decode with a DynamicCache, and decode with a
StaticCache under torch.compile(mode="reduce-overhead") (CUDA graphs), at each context; prefill of
1024 tokens. Median of timed steps after warm-up, synchronised, as in the device tool's METHOD.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parent.parent


def timed(fn: Callable[[], object], steps: int, warmup: int = 3) -> float:
    """Median seconds of fn() over ``steps`` runs after warm-ups (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Print (and optionally save) the baseline figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "mistral-7b-v0.1.json"))
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--batches", default="",
                        help="also batched decode at the first context: e.g. 8,32,64")
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    # full-attention layers for the static cache: with sliding-window layers transformers keeps
    # the cache length as a Python int and torch.compile recompiles every step (TOOLCHAIN.md)
    # the config's own model_type: mistral, or mixtral (its experts as transformers runs them)
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items()
                                                  if k not in ("architectures", "torch_dtype")})
    hf_cfg.sliding_window = None
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.float16)
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
        torch.set_default_dtype(torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    contexts = [int(c) for c in args.contexts.split(",")]
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__, "weight_bytes": weight_bytes, "rows": []}
    print(f"{out['gpu']}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"weights {weight_bytes / 1e9:.2f} GB")
    n = 1024
    ids = torch.randint(3, hf_cfg.vocab_size, (1, n), device="cuda")
    with torch.no_grad():
        t = timed(lambda: model(ids, logits_to_keep=1), 3, warmup=1)
    out["prefill_1024_ms"] = t * 1e3
    print(f"eager prefill {n} tokens: {t * 1e3:.1f} ms ({n / t:.0f} tok/s)")

    def record(name: str, context: int, seconds: float) -> None:
        row = {"method": name, "context": context, "ms_per_token": seconds * 1e3,
               "tokens_per_s": 1 / seconds, "weight_GBps": weight_bytes / seconds / 1e9}
        out["rows"].append(row)
        print(f"{name:<34} context {context:6d}: {seconds * 1e3:7.2f} ms/token, "
              f"{1 / seconds:7.1f} tok/s, weights {row['weight_GBps']:.0f} GB/s")

    for context in contexts:
        prompt = torch.randint(3, hf_cfg.vocab_size, (1, context), device="cuda")
        with torch.no_grad():
            cache = transformers.DynamicCache()
            model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = torch.tensor([[5]], device="cuda")

            def eager_step(tok: torch.Tensor = tok, cache: object = cache,
                           context: int = context) -> None:
                model(tok, past_key_values=cache, use_cache=True)
                cache.crop(context)
            record("eager, DynamicCache", context, timed(eager_step, args.steps))
    if not args.no_compile:
        for context in contexts:
            cache = transformers.StaticCache(config=hf_cfg, max_cache_len=context + 64)
            prompt = torch.randint(3, hf_cfg.vocab_size, (1, context), device="cuda")
            with torch.no_grad():
                model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1,
                      cache_position=torch.arange(context, device="cuda"))
            step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            tok = torch.tensor([[5]], device="cuda")
            pos = torch.tensor([context], device="cuda")

            def compiled_step(step: Callable = step, tok: torch.Tensor = tok,
                              cache: object = cache, pos: torch.Tensor = pos) -> None:
                with torch.no_grad():
                    step(tok, past_key_values=cache, use_cache=True, cache_position=pos)
            start = time.perf_counter()
            try:  # a model torch.compile cannot take whole (fullgraph) is reported, not fatal
                compiled_step()
                compiled_step()
            except Exception as exc:  # noqa: BLE001 (any compile failure: the eager rows stand)
                print(f"  torch.compile failed at context {context}: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200]}")
                continue
            torch.cuda.synchronize()
            print(f"  torch.compile warm-up {time.perf_counter() - start:.0f} s")
            record("StaticCache + torch.compile", context, timed(compiled_step, args.steps))
    for batch in [int(b) for b in args.batches.split(",") if b]:
        context = contexts[0]  # batched decode: B sequences of `context` tokens, one step
        torch._dynamo.reset()
        cache = transformers.StaticCache(config=hf_cfg, max_cache_len=context + 64,
                                         max_batch_size=batch)
        prompt = torch.randint(3, hf_cfg.vocab_size, (batch, context), device="cuda")
        with torch.no_grad():
            for i in range(0, context, 256):  # in pieces: eager attention's scores stay small
                model(prompt[:, i:i + 256], past_key_values=cache, use_cache=True,
                      logits_to_keep=1, cache_position=torch.arange(i, min(i + 256, context),
                                                                    device="cuda"))
        step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        tok = torch.full((batch, 1), 5, device="cuda")
        pos = torch.tensor([context], device="cuda")

        def batch_step(step: Callable = step, tok: torch.Tensor = tok, cache: object = cache,
                       pos: torch.Tensor = pos) -> None:
            with torch.no_grad():
                step(tok, past_key_values=cache, use_cache=True, cache_position=pos)
        batch_step()
        batch_step()
        t = timed(batch_step, args.steps)
        row = {"method": "StaticCache + torch.compile", "batch": batch, "context": context,
               "ms_per_step": t * 1e3, "tokens_per_s": batch / t}
        out.setdefault("batch_rows", []).append(row)
        print(f"StaticCache + torch.compile, batch {batch:3d} at {context}: {t * 1e3:7.2f} "
              f"ms/step, {batch / t:8.0f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
