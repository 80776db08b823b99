"""Write a tiny random Mistral checkpoint with transformers (seeded) for trying the tool chain.

Usage: python examples/make_tiny_checkpoint.py OUT_DIR [--config configs/tiny-mistral.json]
The checkpoint is what transformers' own save_pretrained writes: config.json + model.safetensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny-mistral.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    cfg = json.loads(Path(args.config).read_text())
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg))
    model.save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
