"""Load benchmark: N concurrent streaming clients against a running `mistral-compile serve`.

Usage: python benchmarks/serve_load.py --base-url http://127.0.0.1:8000/v1 [--api-key KEY]
    [--model NAME] [--requests 256] [--concurrency 64] [--prompt-tokens 512]
    [--output-tokens 128] [--spread 0.5] [--vocab 32000] [--seed 0] [--json FILE]

Workload (seeded): each request is /v1/completions with `prompt` = random token ids, its length
uniform in [IN (1 - spread), IN (1 + spread)], and `max_tokens` uniform likewise around OUT,
`ignore_eos` so every request generates its full budget, greedy. `concurrency` clients each send
their next request when the previous one ends. Reports requests/s, output tok/s, TTFT and ITL
p50/p99 (ITL: the time between a stream's consecutive chunks that carry text or a token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np


async def one(client, model: str, prompt: list[int], max_tokens: int) -> dict:  # noqa: ANN001
    """One streamed request: its TTFT, the gaps between its chunks, its token budget."""
    start = time.perf_counter()
    stamps = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    async for _chunk in stream:
        stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start if stamps else None,
            "itl": list(np.diff(stamps)), "tokens": max_tokens}


async def run(args: argparse.Namespace) -> dict:
    """The whole workload, ``concurrency`` clients at a time; the figures."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "unused",
                         max_retries=0, timeout=3600)
    model = args.model or (await client.models.list()).data[0].id
    rng = np.random.default_rng(args.seed)
    low, high = 1 - args.spread, 1 + args.spread
    work = [(rng.integers(3, args.vocab, max(1, int(args.prompt_tokens *
                                                    rng.uniform(low, high)))).tolist(),
             max(1, int(args.output_tokens * rng.uniform(low, high))))
            for _ in range(args.requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    results = []

    async def client_loop() -> None:
        while not queue.empty():
            prompt, out = queue.get_nowait()
            results.append(await one(client, model, prompt, out))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
    seconds = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": args.requests, "concurrency": args.concurrency,
            "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
            "spread": args.spread, "seconds": seconds, "requests_per_s": len(results) / seconds,
            "output_tokens_per_s": tokens / seconds,
            "ttft_ms_p50": float(np.percentile(ttft, 50) * 1e3),
            "ttft_ms_p99": float(np.percentile(ttft, 99) * 1e3),
            "itl_ms_p50": float(np.percentile(itl, 50) * 1e3) if itl else None,
            "itl_ms_p99": float(np.percentile(itl, 99) * 1e3) if itl else None}


def main() -> None:
    """Drive the server and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="default: the server's only model")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--spread", type=float, default=0.5)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"{result['requests']} requests, {result['concurrency']} concurrent: "
          f"{result['requests_per_s']:.2f} req/s, {result['output_tokens_per_s']:.0f} output "
          f"tok/s; TTFT p50/p99 {result['ttft_ms_p50']:.0f}/{result['ttft_ms_p99']:.0f} ms; "
          f"ITL p50/p99 {result['itl_ms_p50'] or 0:.1f}/{result['itl_ms_p99'] or 0:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
