"""`mistral-compile bench`: prefill and decode speed, bandwidth and FLOP utilisation, as JSON."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mistral_compile.runtime.library import (
    STATE_PREFIX,
    load_vm,
    parse_device,
    read_metadata,
    tvm_device,
)

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint32": 4}


def median_seconds(fn: Callable[[], Any], warmup: int, repeats: int,
                   sync: Callable[[], None], setup: Callable[[], Any] | None = None) -> float:
    """Median wall time of ``fn`` (device synchronised around each run) after warm-ups.

    ``setup`` runs before each call of ``fn``, outside the timed span.
    """
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_params(lib: Path, device: str, seed: int = 0) -> dict[str, Any]:
    """Random weights (std 0.02, norms 1) made on the device, by torch when it is there.

    4-bit weights get random codes (-7..7 after the zero point) and scales 0.02 / 4.3 (about
    std 0.02); q4f16_2's minimums are -7 scales (the same weights' distribution).
    """
    import tvm

    kind, index = parse_device(device)
    meta = read_metadata(load_vm(lib, tvm_device(kind, index), kind))
    shapes = dict(zip(meta["params"], meta["param_shapes"], strict=True))
    dtypes = dict(zip(meta["params"], meta["param_dtypes"], strict=True))
    try:
        import torch
    except ImportError:
        torch = None
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    if torch is not None:
        gen = torch.Generator(device="cuda" if kind == "cuda" else "cpu").manual_seed(seed)
        tdev = f"cuda:{index}" if kind == "cuda" else "cpu"
    for name, shape in shapes.items():
        if name.startswith(STATE_PREFIX):  # the KV cache: the engine allocates it
            continue
        dtype = dtypes[name]
        fill = 1.0 if name.endswith("norm.weight") else 0.02 / 4.3 if name.endswith(
            "q_scale") else -7 * 0.02 / 4.3 if name.endswith("q_min") else None
        if dtype == "uint32":  # packed 4-bit codes, each uniform on 0..14
            out[name] = tvm.runtime.tensor(_random_codes(shape, torch, gen, tdev, rng)
                                           if torch is not None else
                                           _random_codes(shape, None, None, None, rng),
                                           tvm_device(kind, index))
        elif torch is not None:
            tdtype = getattr(torch, dtype)
            out[name] = torch.full(shape, fill, dtype=tdtype, device=tdev) if fill else \
                torch.randn(shape, generator=gen, dtype=tdtype, device=tdev) * 0.02
        else:
            a = np.full(shape, fill, dtype) if fill else \
                (rng.standard_normal(shape) * 0.02).astype(dtype)
            out[name] = tvm.runtime.tensor(a, tvm_device(kind, index))
    return out


@dataclass(frozen=True)
class RandomParams:
    """Random weights that each tensor-parallel shard makes in its own process.

    A shard's weights are its part of the model, on its own device: the driver passes this
    (picklable) maker instead of weights, and shard ``rank`` calls it (runtime/shards.py), with
    seed ``seed + rank``.
    """

    lib: str
    seed: int = 0

    def __call__(self, device: str, rank: int = 0) -> dict[str, Any]:
        return random_params(Path(self.lib), device, self.seed + rank)


def make_random_weights(lib: str | Path, device: str,
                        seed: int = 0) -> dict[str, Any] | RandomParams:
    """``--random-weights``: made here, or for a tensor-parallel library by each shard."""
    from mistral_compile.runtime.parallel import library_shards

    if library_shards(lib, device) > 1:
        return RandomParams(str(lib), seed)
    return random_params(Path(lib), device, seed)


def _random_codes(shape: Sequence[int], torch: Any, gen: Any, tdev: Any,
                  rng: np.random.Generator) -> np.ndarray:
    """uint32 words of 8 random 4-bit codes on 0..14: weights -7..7 scales, mean zero.

    Code 15 is left out on purpose: with it every weight would average +scale/2, and 32
    layers of such random weights overflowed float16 activations (NaN logits).
    """
    if torch is not None:
        codes = torch.randint(0, 15, (*shape, 8), generator=gen, device=tdev)
        words = (codes << (4 * torch.arange(8, device=tdev))).sum(-1)
        return words.cpu().numpy().astype(np.uint32)
    codes = rng.integers(0, 15, (*shape, 8), dtype=np.uint64)
    return (codes << (4 * np.arange(8, dtype=np.uint64))).sum(-1).astype(np.uint32)


def copy_bandwidth(device: Any, nbytes: int, warmup: int = 3, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import tvm

    n = nbytes // 2
    a = tvm.runtime.empty((n,), "float16", device)
    b = tvm.runtime.empty((n,), "float16", device)
    a.copyfrom(np.random.default_rng(0).standard_normal(n).astype("float16"))
    t = median_seconds(lambda: a.copyto(b), warmup, repeats, device.sync)
    return 2 * nbytes / t / 1e9


def matmul_tflops(device_kind: str, index: int) -> float | None:
    """fp16 dense matrix throughput measured with torch (cuBLAS) on the GPU, if torch is there."""
    if device_kind != "cuda":
        return None
    try:
        import torch
    except ImportError:
        return None
    n = 8192
    a = torch.randn(n, n, device=f"cuda:{index}", dtype=torch.float16)
    b = torch.randn(n, n, device=f"cuda:{index}", dtype=torch.float16)
    t = median_seconds(lambda: a @ b, 3, 10, torch.cuda.synchronize)
    return 2 * n**3 / t / 1e12


def prefill_flops(config: Any, n: int) -> float:
    """Forward FLOPs of prefilling ``n`` tokens into an empty cache.

    The matmuls (a mixture of experts: the k experts a token is routed to), plus causal
    attention where a windowed layer's query sees min(position + 1, window) keys.
    """
    h, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads, config.num_key_value_heads
    mlp = 3 * 2 * h * config.intermediate_size
    if config.is_moe:  # a token's k chosen experts and the router (the work it needs)
        mlp = mlp * config.num_experts_per_tok + 2 * h * config.num_local_experts
    matmul = 2 * h * (q + 2 * kv) * hd + 2 * q * hd * h + mlp
    flops = n * (config.num_hidden_layers * matmul + 2 * h * config.vocab_size)
    for w in config.layer_sliding_window_sizes:
        w = n if w <= 0 else min(w, n)
        keys = w * (w + 1) // 2 + (n - w) * w  # sum over queries of visible keys
        flops += 2 * 2 * q * hd * keys  # q.k and p.v
    return float(flops)


def run_bench(model_dir: str | Path, lib: str | Path, device: str = "cuda",
              random_weights: bool = False, prefill_chunks: Sequence[int] = (512, 2048, 4096),
              contexts: Sequence[int] = (1024, 4096, 16384, 32768), decode_steps: int = 32,
              warmup: int = 3, repeats: int = 5, copy_bytes: int = 1 << 30,
              log: Callable[[str], None] = print, kv_cache: str | None = None) -> dict[str, Any]:
    """Measure and return a dict of figures (see docs/benchmarks.md for what each means)."""
    from mistral_compile.runtime.engine import Engine

    model_dir, lib = Path(model_dir), Path(lib)
    kind, index = parse_device(device)
    params = make_random_weights(lib, device) if random_weights else None
    engine = Engine(model_dir, lib, device=device, attention_sink_size=0,
                    prefill_chunk_size=max(prefill_chunks), params=params, progress=True,
                    kv_cache=kv_cache)
    try:
        cfg, dev = engine.config, engine.device
        sizes = {n: int(np.prod(s)) * _BYTES[d] for n, s, d in zip(
            engine.meta["params"], engine.meta["param_shapes"], engine.meta["param_dtypes"],
            strict=True) if not n.startswith(STATE_PREFIX)}
        weight_bytes = sum(sizes.values())
        # what a decode step reads: of a mixture of experts, the k chosen experts' share
        share = cfg.num_experts_per_tok / cfg.num_local_experts if cfg.is_moe else 1.0
        read_bytes = int(sum(b * share if ".experts." in n else b for n, b in sizes.items()))
        kv_bytes = (cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
                    * _BYTES[engine.dtype])
        result: dict[str, Any] = {
            "device": str(dev), "dtype": engine.dtype, "quantization": engine.quantization,
            "cuda_graph": bool(engine.meta.get("cuda_graph")), "kv_cache": engine.kv_cache,
            "weights": "random" if random_weights else str(model_dir),
            "tensor_parallel_shards": cfg.tensor_parallel_shards,  # weight figures: one shard's
            "weight_bytes": weight_bytes, "weight_bytes_read_per_token": read_bytes,
            "window": engine.window,
            "context_window": cfg.context_window_size, "chunk_size": engine.chunk_size,
            "kv_cache_bytes_per_token": kv_bytes,
            "kv_cache_bytes_per_sequence": kv_bytes * engine.capacity
            if engine.capacity > 0 else None,
            "batch_decode": "not used by the engine (batch 1 only)"}
        log(f"weights {weight_bytes / 1e9:.2f} GB ({engine.quantization}"
            + (f"; {read_bytes / 1e9:.2f} GB read per token" if read_bytes != weight_bytes else "")
            + f"), window {engine.window}, chunk {engine.chunk_size}, {engine.kv_cache} KV cache")
        result["copy_bandwidth_GBps"] = copy_bandwidth(dev, copy_bytes)
        result["matmul_TFLOPs"] = matmul_tflops(kind, index)
        log(f"device copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s (read+write); "
            f"fp16 matmul {result['matmul_TFLOPs'] or float('nan'):.0f} TFLOP/s (torch)")
        rng = np.random.default_rng(0)

        def tokens(n: int) -> list[int]:
            return rng.integers(3, cfg.vocab_size, n).tolist()

        prefill = []
        for chunk in prefill_chunks:
            n = min(chunk, engine.chunk_size)
            ids = tokens(n)

            # a fresh cache for each run (allocating its pages is not part of prefill)
            t = median_seconds(lambda ids=ids: engine.prefill(ids), 1, max(2, repeats // 2),
                               dev.sync, setup=engine.reset)
            flops = prefill_flops(cfg, n)
            row = {"tokens": n, "seconds": t, "tokens_per_s": n / t, "TFLOPs": flops / t / 1e12}
            if result["matmul_TFLOPs"]:
                row["MFU"] = row["TFLOPs"] / result["matmul_TFLOPs"]
            prefill.append(row)
            log(f"prefill {n:5d} tokens: {t * 1e3:8.1f} ms, {n / t:8.0f} tok/s, "
                f"{row['TFLOPs']:.1f} TFLOP/s"
                + (f", MFU {row['MFU']:.1%}" if "MFU" in row else ""))
        result["prefill"] = prefill

        decode = []
        for context in contexts:
            limit = cfg.context_window_size
            if 0 < limit < context + decode_steps + warmup:
                if context > limit:
                    log(f"decode at {context}: skipped (context window {limit})")
                    continue
                context = limit - decode_steps - warmup  # the last steps end at the limit
            engine.reset()
            engine.prefill(tokens(context))
            # greedy decoding as `chat` and `generate` run it: each step's argmax stays on the
            # device as the next input, and reading it back (4 bytes) synchronises the step
            steps = engine.greedy(tokens(1)[0])
            for _ in range(warmup):
                next(steps)
            dev.sync()
            times = []
            for _ in range(decode_steps):
                start = time.perf_counter()
                next(steps)
                times.append(time.perf_counter() - start)
            t = statistics.median(times)
            row = {"context": context, "ms_per_token": t * 1e3, "tokens_per_s": 1 / t,
                   "weight_GBps": read_bytes / t / 1e9,
                   "MBU": read_bytes / t / 1e9 / result["copy_bandwidth_GBps"],
                   "cache_tokens_held": min(engine.length, engine.capacity)
                   if engine.capacity > 0 else engine.length}
            decode.append(row)
            log(f"decode at {context:6d}: {t * 1e3:7.2f} ms/token, {1 / t:7.1f} tok/s, weights "
                f"{row['weight_GBps']:.0f} GB/s = {row['MBU']:.1%} of copy bandwidth")
            room = limit <= 0 or engine.length + warmup + decode_steps <= limit
            if context == decode[0]["context"] and room:
                steps.close()
                result["decode_sampled"] = sampled_decode(engine, context, decode_steps, warmup)
                log(f"decode at {context:6d}, sampled ({SAMPLED}): "
                    f"{result['decode_sampled']['ms_per_token']:7.2f} ms/token (sampled on the "
                    "device)")
        result["decode"] = decode
        return result
    finally:
        engine.close()  # a tensor-parallel model's other shards stop with the bench


SAMPLED = "temperature 0.7, top-p 0.95, repetition penalty 1.1"


def sampled_decode(engine: Any, context: int, steps: int, warmup: int) -> dict[str, Any]:
    """Median ms of a sampled decode step as `chat` runs it at its defaults plus a penalty.

    The library's ``sample`` picks each token on the device (runtime/sampler.py); the cache
    continues from where the greedy run left it.
    """
    from mistral_compile.runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0.7, top_p=0.95, repetition_penalty=1.1)
    history = list(engine.tokens)
    tokens = engine.continue_from(engine.decode(history[-1]), params,
                                  np.random.default_rng(0), history)
    next(tokens)  # sampled from the logits above; each next one costs a step
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        next(tokens)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"context": context, "sampling": SAMPLED,
            "ms_per_token": statistics.median(times) * 1e3}


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Save the figures."""
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
