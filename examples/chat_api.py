"""The library API end to end on CPU: tiny checkpoint -> convert -> compile -> streamed chat.

Usage: python examples/chat_api.py [WORK_DIR]   (about a minute; needs torch + transformers)
The model has random weights, so its answers are gibberish; everything else is the real thing:
a real Mistral tokenizer (v3) and chat template, sampling, streaming, KV-cache reuse.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mistral_compile.compiler.pipeline import compile_model
from mistral_compile.runtime import Engine
from mistral_compile.weights import convert_weight

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Build the tiny model if needed, then chat two turns."""
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "dist/example")
    if not (work / "lib.so").is_file():
        subprocess.run([sys.executable, str(HERE / "make_tiny_checkpoint.py"), str(work / "hf"),
                        "--tokenizer", "v3"], check=True)
        convert_weight(work / "hf", work / "model", "q0f32")
        compile_model(work / "model", work / "lib.so", device="cpu")
    engine = Engine(work / "model", work / "lib.so", device="cpu")
    messages = [{"role": "user", "content": "What is a sliding window?"}]
    for follow_up in ("And attention sinks?", None):
        stream = engine.chat(messages, temperature=0.7, top_p=0.95, seed=0, max_tokens=24)
        for piece in stream:
            print(piece, end="", flush=True)
        u = stream.usage
        print(f"\n[{u.completion_tokens} tokens, {u.prefilled_tokens} of {u.prompt_tokens} "
              f"prompt tokens prefilled, {u.decode_tokens_per_second:.0f} tok/s, "
              f"{u.finish_reason}]")
        if follow_up is None:
            break
        messages += [{"role": "assistant", "content": stream.text},
                     {"role": "user", "content": follow_up}]


if __name__ == "__main__":
    main()
