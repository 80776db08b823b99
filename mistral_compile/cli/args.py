"""Argument types and the batched engine's options, shared by the subcommands."""

from __future__ import annotations

import argparse
from typing import Any


def add_library_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL_DIR, --lib and --device: what every command that runs a library takes."""
    parser.add_argument("model_dir", metavar="MODEL_DIR")
    parser.add_argument("--lib", required=True, metavar="LIB.so")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def ints(text: str) -> list[int]:
    """Comma-separated positive integers."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive(text: str) -> int:
    """A positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def triple(text: str) -> tuple[int, int, int]:
    """N:IN:OUT, three positive integers."""
    parts = ints(text.replace(":", ","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected N:IN:OUT, got {text!r}")
    return parts[0], parts[1], parts[2]


def gigabytes(text: str) -> float:
    """A positive, finite number of GB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of GB, got {text!r}")
    return value


def non_negative(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The batched engine's settings (generate, serve, bench --throughput)."""
    parser.add_argument("--max-batch-size", type=positive, default=64,
                        help="sequences running at once (default 64)")
    parser.add_argument("--kv-cache-gb", type=gigabytes, default=None, metavar="G",
                        help="memory for KV pages (default: 90%% of the GPU's free memory after "
                             "the weights; on a CPU what the batch needs, at most 1 GB)")
    parser.add_argument("--prefill-chunk-size", type=positive, default=None, metavar="N",
                        help="prompt tokens per sequence per step (default: the config's)")
    parser.add_argument("--max-num-batched-tokens", type=positive, default=None, metavar="N",
                        help="tokens per step, prompts and decode rows together (default: the "
                             "prefill chunk plus the batch size); fewer cut the time to first "
                             "token of prompts that arrive together, at some throughput")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="do not reuse the KV pages of common prompt prefixes")
    parser.add_argument("--attention-sink-size", type=non_negative, default=0, metavar="S",
                        help="StreamingLLM sinks: each sequence keeps its first S tokens' KV "
                             "past the window (a model whose layers share one window; at most "
                             "16; turns prefix caching off). Default 0: the exact window")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="launch every decode step's kernels from the host (default on "
                             "CUDA: each padded batch size's step is captured once and replayed)")


def engine_config(args: argparse.Namespace) -> Any:
    """The EngineConfig the engine arguments ask for."""
    from mistral_compile.runtime.llm import EngineConfig

    return EngineConfig(max_batch_size=args.max_batch_size,
                        prefill_chunk_size=args.prefill_chunk_size,
                        max_step_tokens=args.max_num_batched_tokens,
                        kv_cache_bytes=None if args.kv_cache_gb is None
                        else int(args.kv_cache_gb * 2**30),
                        prefix_caching=not args.no_prefix_caching,
                        attention_sink_size=args.attention_sink_size,
                        cuda_graphs=not args.no_cuda_graphs)
