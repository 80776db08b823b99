"""Write a tiny random Mistral checkpoint with transformers (seeded) for trying the tool chain.

Usage: python examples/make_tiny_checkpoint.py OUT_DIR [--tokenizer v3] [--config FILE]
The checkpoint is what transformers' own save_pretrained writes: config.json + model.safetensors.
With --tokenizer, one of mistral-common's real tokenizers is copied in and the vocabulary sized
to it, so `mistral-compile chat` works (the answers are gibberish: the weights are random).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parent.parent
# mistral-common's bundled tokenizer files, and the name each has in a model directory
TOKENIZERS = {"v1": ("tokenizer.model.v1", "tokenizer.model"),
              "v3": ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3"),
              "tekken": ("tekken_240911.json", "tekken.json")}


def main() -> None:
    """Write the checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny-mistral.json"))
    parser.add_argument("--tokenizer", choices=sorted(TOKENIZERS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    cfg = json.loads(Path(args.config).read_text())
    out = Path(args.out_dir)
    tokenizer_file = None
    if args.tokenizer:
        import mistral_common
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        source, name = TOKENIZERS[args.tokenizer]
        tokenizer_file = (Path(mistral_common.__file__).parent / "data" / source, name)
        raw = MistralTokenizer.from_file(str(tokenizer_file[0])).instruct_tokenizer.tokenizer
        cfg.update(vocab_size=raw.n_words, bos_token_id=raw.bos_id, eos_token_id=raw.eos_id)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg))
    model.save_pretrained(out)
    if tokenizer_file:
        shutil.copy(tokenizer_file[0], out / tokenizer_file[1])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
