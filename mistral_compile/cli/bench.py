"""`mistral-compile bench`: arguments for runtime.bench.run_bench."""

from __future__ import annotations

import argparse


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    parser = commands.add_parser(
        "bench", help="measure prefill and decode speed of a compiled library",
        description="Prefill tokens/s per chunk size, batch-1 decode latency at several "
                    "contexts, achieved weight bandwidth against the device's copy bandwidth, "
                    "prefill FLOP utilisation, KV-cache bytes; JSON with --json.")
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a convert-weight output, or a convert-config output with "
                             "--random-weights")
    parser.add_argument("--lib", required=True, metavar="LIB.so")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--random-weights", action="store_true",
                        help="make random weights on the device (no checkpoint needed)")
    parser.add_argument("--prefill-chunks", type=_ints, default=[512, 2048, 4096])
    parser.add_argument("--contexts", type=_ints, default=None,
                        help="decode contexts (default 1024,4096,16384,32768; with --batch "
                             "1024,4096)")
    parser.add_argument("--decode-steps", type=_positive, default=32)
    parser.add_argument("--kv-cache", choices=["owned", "paged"], default="owned",
                        help="the model-owned KV cache (default; a decode step is one CUDA "
                             "graph) or TVM's paged one (what attention sinks use)")
    parser.add_argument("--batch", type=_ints, default=None, metavar="B,B,...",
                        help="batched engine: decode step time and tok/s with B sequences at "
                             "each context (e.g. 1,8,32,64,128)")
    parser.add_argument("--throughput", type=_triple, action="append", default=None,
                        metavar="N:IN:OUT",
                        help="batched engine: N requests of IN prompt and OUT output tokens "
                             "at once: output tok/s, TTFT and ITL p50/p99, pages, preemptions "
                             "(repeatable)")
    from mistral_compile.cli.generate import add_engine_arguments

    add_engine_arguments(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.set_defaults(run=run)


def _triple(text: str) -> tuple[int, int, int]:
    parts = _ints(text.replace(":", ","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected N:IN:OUT, got {text!r}")
    return parts[0], parts[1], parts[2]


def run(args: argparse.Namespace) -> int:
    """Measure and print."""
    from mistral_compile.runtime.bench import run_bench, write_json

    if args.batch or args.throughput:
        from mistral_compile.cli.generate import engine_config
        from mistral_compile.runtime.bench_batch import run_batch_bench

        if args.max_batch_size == 64 and args.batch:  # default: room for the largest batch
            args.max_batch_size = max(args.batch)
        result = run_batch_bench(args.model_dir, args.lib, args.device, args.random_weights,
                                 args.batch or [], args.contexts or [1024, 4096],
                                 args.throughput or [], args.decode_steps,
                                 engine_config(args))
    else:
        result = run_bench(args.model_dir, args.lib, args.device, args.random_weights,
                           args.prefill_chunks, args.contexts or [1024, 4096, 16384, 32768],
                           args.decode_steps, kv_cache=args.kv_cache)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0
