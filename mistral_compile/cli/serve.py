"""`mistral-compile serve`: an OpenAI-compatible HTTP server (mistral_compile/serve/)."""

from __future__ import annotations

import argparse
import os

from mistral_compile.cli.args import (
    add_engine_arguments,
    add_library_arguments,
    engine_config,
    positive,
)

API_KEY_ENV = "MISTRAL_COMPILE_API_KEY"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    parser = commands.add_parser(
        "serve", help="serve a compiled model over an OpenAI-compatible HTTP API",
        description="POST /v1/chat/completions and /v1/completions (streaming as server-sent "
                    "events), GET /v1/models and /health, over the batched runtime.")
    add_library_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=positive, default=8000)
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (or set ${API_KEY_ENV})")
    parser.add_argument("--served-model-name", default=None,
                        help="the model's name in the API (default: MODEL_DIR's folder name)")
    parser.add_argument("--max-queue", type=positive, default=1024,
                        help="waiting requests before 503 (default 1024)")
    parser.add_argument("--tokenizer", choices=["mistral", "hf"], default=None)
    parser.add_argument("--random-weights", action="store_true",
                        help="make random weights on the device (load tests of a model shape; "
                             "MODEL_DIR may hold only mistral-config.json)")
    parser.add_argument("--engine-thread", action="store_true",
                        help="run the engine on a thread of the server's process (default: a "
                             "process of its own, so HTTP work never holds the engine's GIL)")
    add_engine_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load the engine and serve until interrupted."""
    import logging
    from pathlib import Path

    import uvicorn

    from mistral_compile.serve.app import build_app
    from mistral_compile.tokenizer import FAMILY_CHOICES

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    family = FAMILY_CHOICES[args.tokenizer] if args.tokenizer else None
    if args.engine_thread:
        from mistral_compile.runtime.llm import LLM
        from mistral_compile.serve.engine_loop import AsyncEngine

        params = None
        if args.random_weights:
            from mistral_compile.runtime.bench import make_random_weights

            params = make_random_weights(args.lib, args.device)
        engine = AsyncEngine(LLM(args.model_dir, args.lib, args.device, engine_config(args),
                                 params=params, progress=True, tokenizer=family))
    else:
        from mistral_compile.serve.engine_process import EngineProcess

        engine = EngineProcess(args.model_dir, args.lib, args.device, engine_config(args),
                               args.random_weights, family)
    if not engine.has_tokenizer():
        logging.getLogger("mistral_compile.serve").warning(
            "no tokenizer: only /v1/completions with token-id prompts work, without text")
    name = args.served_model_name or Path(args.model_dir).resolve().name
    app = build_app(engine, name, api_key, args.max_queue)
    logging.getLogger("mistral_compile.serve").info(
        "serving '%s' on http://%s:%d/v1 (API key %s)", name, args.host, args.port,
        "required" if api_key else "not required")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
