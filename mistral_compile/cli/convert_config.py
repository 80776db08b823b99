"""`mistral-compile convert-config`: arguments for config.convert_config."""

from __future__ import annotations

import argparse

from mistral_compile.config import convert_config


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    parser = commands.add_parser(
        "convert-config",
        help="normalize a Hugging Face config.json or Mistral params.json",
        description="Read SOURCE (a directory with config.json or params.json, one of those "
                    "files, or a Hugging Face repo id already in the local cache) and write "
                    "OUT_DIR/mistral-config.json with every derived value settled.")
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    add_override_arguments(parser)
    parser.set_defaults(run=run)


_OVERRIDES = ("context_window_size", "sliding_window_size", "attention_sink_size",
              "prefill_chunk_size", "max_batch_size", "tensor_parallel_shards")


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """The config fields a user may set on the command line (they take part in derivation)."""
    group = parser.add_argument_group("config overrides")
    group.add_argument("--context-window-size", type=int, metavar="N",
                       help="longest sequence; -1 = unbounded (needs a window on every layer)")
    group.add_argument("--sliding-window-size", type=int, metavar="N",
                       help="window for windowed layers (all layers if none has one); "
                            "-1 disables windows")
    group.add_argument("--attention-sink-size", type=int, metavar="N",
                       help="tokens always kept at the start when the window slides")
    group.add_argument("--prefill-chunk-size", type=int, metavar="N")
    group.add_argument("--max-batch-size", type=int, metavar="N")
    group.add_argument("--tensor-parallel-shards", type=int, metavar="N",
                       help="shards the compiled library's heads and MLP over N processes "
                            "(compile --tensor-parallel-shards N does the same for one library)")


def overrides_from(args: argparse.Namespace) -> dict[str, int | None]:
    """The override flags as MistralConfig field names (None = not given)."""
    return {name: getattr(args, name) for name in _OVERRIDES}


def run(args: argparse.Namespace) -> int:
    """Convert and print a summary of the derived values."""
    config, path = convert_config(args.source, args.output, overrides_from(args))
    print(f"wrote {path}")
    print(config.summary())
    return 0
