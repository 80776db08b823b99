"""`mistral-compile convert-weight`: arguments for weights.convert_weight."""

from __future__ import annotations

import argparse

from mistral_compile.cli.convert_config import add_override_arguments, overrides_from
from mistral_compile.tokenizer import BUNDLED_VERSIONS, FAMILY_CHOICES
from mistral_compile.weights import QUANTIZATIONS, convert_weight


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    parser = commands.add_parser(
        "convert-weight", help="convert a checkpoint into fused, validated parameters",
        description="Read a Hugging Face (config.json + model.safetensors[.index.json]), "
                    "Mistral-native (params.json + consolidated.safetensors) checkpoint "
                    "directory, or a GGUF file (llama.cpp's llama architecture; its tensors "
                    "dequantized, its tokenizer rebuilt as tokenizer.json), and write OUT_DIR "
                    "with weight shards, mistral-config.json, tokenizer files and a manifest "
                    "of sha256 sums.")
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    parser.add_argument("--quantization", default="q0f16", choices=sorted(QUANTIZATIONS))
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept .bin/.pth pickle checkpoints (they can run code)")
    parser.add_argument("--config", metavar="CONFIG",
                        help="use this mistral-config.json (or a directory holding one, as "
                             "written by convert-config) instead of the checkpoint's config")
    parser.add_argument("--tokenizer-version", choices=BUNDLED_VERSIONS,
                        help="record which of mistral-common's tokenizers the model uses, for "
                             "checkpoints without tekken.json / tokenizer.model*")
    parser.add_argument("--tokenizer", choices=list(FAMILY_CHOICES), default="auto",
                        help="tokenizer family: mistral-common (tekken.json, tokenizer.model*) "
                             "or hf (tokenizer.json + chat template); auto: mistral-common when "
                             "a Mistral file is there, else hf (docs: tokenizer choice)")
    add_override_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Convert and say where the result is."""
    out = convert_weight(args.source, args.output, args.quantization, args.allow_pickle,
                         config=args.config, overrides=overrides_from(args),
                         tokenizer_version=args.tokenizer_version,
                         tokenizer=FAMILY_CHOICES[args.tokenizer])
    print(f"wrote {out}")
    return 0
