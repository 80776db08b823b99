"""`mistral-compile chat`: arguments for runtime.repl.run_chat."""

from __future__ import annotations

import argparse

from mistral_compile.cli.args import add_library_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    parser = commands.add_parser(
        "chat", help="chat with a compiled model in the terminal",
        description="Load MODEL_DIR (a convert-weight output) with the compiled library and chat: "
                    "answers stream as they are generated, follow-up turns reuse the KV cache.")
    add_library_arguments(parser)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest (0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="CTRL-style penalty on seen tokens (1 = off)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="longest answer (default: until EOS or the context is full)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the answer before TEXT (repeatable)")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    parser.add_argument("--seed", type=int, default=None, help="reproducible sampling")
    parser.add_argument("--attention-sink-size", type=int, default=None, metavar="N",
                        help="override the config's sink count (0 = pure sliding window)")
    parser.add_argument("--tokenizer", choices=["mistral", "hf"], default=None,
                        help="use this tokenizer family instead of the one recorded at "
                             "conversion (both must be in MODEL_DIR)")
    parser.add_argument("--verify", action="store_true",
                        help="check every weight file's sha256 against the manifest before "
                             "loading (sizes are always checked)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load and chat."""
    from mistral_compile.runtime.engine import Engine
    from mistral_compile.runtime.repl import run_chat
    from mistral_compile.runtime.sampling import SamplingParams
    from mistral_compile.tokenizer import FAMILY_CHOICES

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    engine = Engine(args.model_dir, args.lib, device=args.device,
                    attention_sink_size=args.attention_sink_size, progress=True,
                    tokenizer=FAMILY_CHOICES[args.tokenizer] if args.tokenizer else None,
                    verify=args.verify)
    return run_chat(engine, params, system=args.system)
