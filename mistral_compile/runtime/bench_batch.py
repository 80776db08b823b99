"""`bench --batch` and `bench --throughput`: the batched engine's step time and throughput."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mistral_compile.runtime.llm import LLM, EngineConfig
from mistral_compile.runtime.sampling import SamplingParams


def _engine(model_dir: Path, lib: Path, device: str, params: Any,
            settings: EngineConfig) -> LLM:
    return LLM(model_dir, lib, device, settings, params=params, progress=True)


def _prompts(rng: np.random.Generator, vocab: int, n: int, length: int) -> list[list[int]]:
    return [rng.integers(3, vocab, length).tolist() for _ in range(n)]


SAMPLED = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=10**6, ignore_eos=True)


def batch_decode(llm: LLM, batches: Sequence[int], contexts: Sequence[int], steps: int,
                 sync: Callable[[], None], log: Callable[[str], None],
                 params: SamplingParams | None = None) -> list[dict[str, Any]]:
    """Median time of a decode step with B sequences at context C (greedy, on the device).

    The B prompts are read first (chunked prefill), then ``steps`` decode steps are timed,
    each one scheduling, running ``batch_step``, sampling and reading the tokens back.
    """
    rng = np.random.default_rng(0)
    rows = []
    params = params or SamplingParams(max_tokens=10**6, ignore_eos=True)
    for context in contexts:
        for batch in batches:
            ids = []
            for i, prompt in enumerate(_prompts(rng, llm.config.vocab_size, batch, context)):
                ids.append(("bench", context, batch, i))
                llm.add_request(ids[-1], prompt, params, text=False)
            while any(not llm.outputs[i].token_ids for i in ids):
                llm.step()
            for _ in range(3):
                llm.step()
            times = []
            for _ in range(steps):
                sync()
                start = time.perf_counter()
                llm.step()
                times.append(time.perf_counter() - start)
            for i in ids:
                llm.abort(i)
                llm.outputs.pop(i)
            t = statistics.median(times)
            stats = llm.stats()
            row = {"batch": batch, "context": context, "ms_per_step": t * 1e3,
                   "tokens_per_s": batch / t, "sampling": "greedy" if params.greedy else
                   f"temperature {params.temperature}, top-p {params.top_p}",
                   "stats": stats}
            rows.append(row)
            log(f"batch {batch:4d} at context {context:6d}: {t * 1e3:8.2f} ms/step, "
                f"{batch / t:9.0f} tok/s ({row['sampling']})")
    return rows


def throughput(llm: LLM, n: int, prompt_len: int, output_len: int,
               log: Callable[[str], None]) -> dict[str, Any]:
    """N requests of IN prompt and OUT output tokens submitted at once, run to the end."""
    rng = np.random.default_rng(1)
    prompts = _prompts(rng, llm.config.vocab_size, n, prompt_len)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    before = llm.scheduler.preemptions
    most_pages = 0
    start = time.perf_counter()
    ids = []
    for i, p in enumerate(prompts):
        ids.append(("throughput", i))
        llm.add_request(ids[-1], p, params, text=False)
    while llm.has_unfinished():
        llm.step()
        most_pages = max(most_pages, sum(p.in_use for p in llm.kv.pools))
    seconds = time.perf_counter() - start
    outs = [llm.outputs.pop(i) for i in ids]
    ttft = [o.first_token_time - o.arrival_time for o in outs]
    itl = [b - a for o in outs for a, b in zip(o.token_times, o.token_times[1:], strict=False)]
    generated = sum(len(o.token_ids) for o in outs)
    row = {"requests": n, "prompt_tokens": prompt_len, "output_tokens": output_len,
           "seconds": seconds, "output_tokens_per_s": generated / seconds,
           "requests_per_s": n / seconds,
           "ttft_ms_p50": float(np.percentile(ttft, 50) * 1e3),
           "ttft_ms_p99": float(np.percentile(ttft, 99) * 1e3),
           "itl_ms_p50": float(np.percentile(itl, 50) * 1e3) if itl else None,
           "itl_ms_p99": float(np.percentile(itl, 99) * 1e3) if itl else None,
           "most_pages_in_use": most_pages, "pages": sum(p.num_pages for p in llm.kv.pools),
           "preemptions": llm.scheduler.preemptions - before}
    log(f"throughput {n}:{prompt_len}:{output_len}: {row['output_tokens_per_s']:.0f} output "
        f"tok/s, {row['requests_per_s']:.2f} req/s in {seconds:.1f} s; TTFT p50/p99 "
        f"{row['ttft_ms_p50']:.0f}/{row['ttft_ms_p99']:.0f} ms; ITL p50/p99 "
        f"{row['itl_ms_p50'] or 0:.1f}/{row['itl_ms_p99'] or 0:.1f} ms; pages "
        f"{most_pages}/{row['pages']}; preemptions {row['preemptions']}")
    return row


def run_batch_bench(model_dir: str | Path, lib: str | Path, device: str, random_weights: bool,
                    batches: Sequence[int], contexts: Sequence[int],
                    throughputs: Sequence[tuple[int, int, int]], steps: int = 16,
                    settings: EngineConfig | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Batched decode and throughput figures, with the copy bandwidth of the same run."""
    from mistral_compile.runtime.bench import copy_bandwidth, make_random_weights

    lib = Path(lib)
    params = make_random_weights(lib, device) if random_weights else None
    batch_max = max([*batches, 1])
    settings = settings or EngineConfig(max_batch_size=batch_max)
    llm = _engine(Path(model_dir), lib, device, params, settings)
    try:
        dev = llm.artifact.device
        result: dict[str, Any] = {"device": str(dev), "dtype": llm.artifact.dtype,
                                  "quantization": llm.artifact.quantization,
                                  "weight_bytes": llm.artifact.weight_bytes,
                                  "max_batch_size": settings.max_batch_size,
                                  "chunk_size": llm.chunk_size,
                                  "pages": [p.num_pages for p in llm.kv.pools],
                                  "kv_pool_bytes": llm.runner.pool_bytes}
        result["copy_bandwidth_GBps"] = copy_bandwidth(dev, 1 << 30)
        log(f"weights {result['weight_bytes'] / 1e9:.2f} GB, KV pools "
            f"{result['kv_pool_bytes'] / 2**30:.1f} GiB ({result['pages']} pages), copy bandwidth "
            f"{result['copy_bandwidth_GBps']:.0f} GB/s")
        if batches:
            result["batch_decode"] = batch_decode(llm, batches, contexts, steps, dev.sync, log)
            sampled = batch_decode(llm, batches[:1], contexts[:1], steps, dev.sync, log, SAMPLED)
            result["batch_decode_sampled"] = sampled
            greedy = result["batch_decode"][0]["ms_per_step"]
            result["sampled_over_greedy"] = sampled[0]["ms_per_step"] / greedy
            log(f"sampled / greedy step at batch {batches[0]}: {result['sampled_over_greedy']:.3f}")
        result["throughput"] = [throughput(llm, *spec, log) for spec in throughputs]
        return result
    finally:
        llm.close()  # a tensor-parallel model's other shards stop with the bench
