"""Normalize a config with the library API (the same work `mistral-compile convert-config` does).

Run: python examples/convert_config.py configs/mistral-7b-v0.1.json /tmp/mistral-7b
"""

import sys

from mistral_compile.config import convert_config

source = sys.argv[1] if len(sys.argv) > 1 else "configs/tiny-mistral.json"
out_dir = sys.argv[2] if len(sys.argv) > 2 else "dist/example"
config, path = convert_config(source, out_dir, {"attention_sink_size": 0})
print(f"wrote {path}")
print(config.summary())
