"""`mistral-compile generate`: offline batched inference over a JSONL file of requests."""

from __future__ import annotations

import argparse

from mistral_compile.cli.args import (
    add_engine_arguments,
    add_library_arguments,
    engine_config,
    positive,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    parser = commands.add_parser(
        "generate", help="run many prompts at once (offline batched inference)",
        description="Read requests from a JSONL file, one per line: {\"id\": ..., "
                    "\"prompt_token_ids\": [...]} or {\"prompt\": \"...\"} or {\"messages\": "
                    "[...]}, with optional sampling fields (max_tokens, temperature, top_p, "
                    "top_k, min_p, seed, stop, presence_penalty, frequency_penalty, "
                    "repetition_penalty, logit_bias, logprobs, ignore_eos). Write one line per "
                    "request, in input order: {\"id\", \"token_ids\", \"text\", "
                    "\"finish_reason\", \"usage\"}.")
    add_library_arguments(parser)
    parser.add_argument("--input", required=True, metavar="PROMPTS.jsonl")
    parser.add_argument("--output", default=None, metavar="OUT.jsonl",
                        help="where to write the results (default: standard output)")
    parser.add_argument("--max-tokens", type=positive, default=256,
                        help="longest output where a line gives none (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="where a line gives none (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for lines without one (default: random per request)")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="end an output before TEXT (repeatable)")
    parser.add_argument("--tokenizer", choices=["mistral", "hf"], default=None,
                        help="tokenizer family instead of the one recorded at conversion")
    add_engine_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Read, check every line, generate, write in input order."""
    import json

    from mistral_compile.io import atomic_write_text
    from mistral_compile.runtime.llm import LLM
    from mistral_compile.runtime.requests import read_requests, sampling_from
    from mistral_compile.tokenizer import FAMILY_CHOICES

    defaults = sampling_from("command line", {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "seed": args.seed, "stop": args.stop}, {})
    defaults = {k: getattr(defaults, k) for k in ("max_tokens", "temperature", "top_p",
                                                  "top_k", "seed", "stop")}
    settings = engine_config(args)
    llm = LLM(args.model_dir, args.lib, args.device, settings, progress=True,
              tokenizer=FAMILY_CHOICES[args.tokenizer] if args.tokenizer else None)
    requests = read_requests(args.input, defaults, lambda: llm.tokenizer,
                             llm.config.vocab_size)
    for r in requests:
        llm.check_request(r.prompt, r.params, where=f"{args.input}: request {r.id!r}")
    outputs = llm.generate([r.prompt for r in requests], [r.params for r in requests],
                           progress=True)
    has_text = llm.has_tokenizer()
    lines = []
    for request, out in zip(requests, outputs, strict=True):
        line = {"id": request.id, "token_ids": out.token_ids}
        if has_text:
            line["text"] = out.text
        line["finish_reason"] = out.finish_reason
        if request.params.logprobs is not None:
            line["logprobs"] = out.logprobs
        line["usage"] = {"prompt_tokens": len(request.prompt),
                         "completion_tokens": len(out.token_ids),
                         "total_tokens": len(request.prompt) + len(out.token_ids),
                         "cached_tokens": out.cached_tokens}
        lines.append(json.dumps(line, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if args.output:
        atomic_write_text(args.output, text)
    else:
        print(text, end="")
    return 0
