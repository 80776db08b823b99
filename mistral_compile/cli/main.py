"""The `mistral-compile` entry point: subcommand parsers, errors reported in one line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mistral_compile import __version__
from mistral_compile.cli import bench, chat, convert_config, convert_weight, generate, serve
from mistral_compile.cli import compile as compile_cmd
from mistral_compile.errors import MistralCompileError

SUBCOMMANDS = (convert_config, convert_weight, compile_cmd, chat, generate, serve, bench)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per subcommand module."""
    parser = argparse.ArgumentParser(
        prog="mistral-compile",
        description="Compile Mistral-family models with TVM and run them.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="[%(name)s] %(message)s", stream=sys.stderr)
    try:
        return args.run(args) or 0
    except MistralCompileError as err:
        print(f"mistral-compile: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mistral-compile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
