"""`mistral-compile bench`: arguments for runtime.bench.run_bench."""

from __future__ import annotations

import argparse

from mistral_compile.cli.args import add_engine_arguments, engine_config, ints, positive, triple


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
    parser.add_argument("--prefill-chunks", type=ints, default=[512, 2048, 4096])
    parser.add_argument("--contexts", type=ints, default=None,
                        help="decode contexts (default 1024,4096,16384,32768; with --batch "
                             "1024,4096)")
    parser.add_argument("--decode-steps", type=positive, default=32)
    parser.add_argument("--kv-cache", choices=["owned", "paged"], default="owned",
                        help="the model-owned KV cache (default; a decode step is one CUDA "
                             "graph) or TVM's paged one (what attention sinks use)")
    parser.add_argument("--batch", type=ints, default=None, metavar="B,B,...",
                        help="batched engine: decode step time and tok/s with B sequences at "
                             "each context (e.g. 1,8,32,64,128)")
    parser.add_argument("--throughput", type=triple, action="append", default=None,
                        metavar="N:IN:OUT",
                        help="batched engine: N requests of IN prompt and OUT output tokens "
                             "at once: output tok/s, TTFT and ITL p50/p99, pages, preemptions "
                             "(repeatable)")
    add_engine_arguments(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Measure and print."""
    from mistral_compile.runtime.bench import run_bench, write_json

    if args.batch or args.throughput:
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
