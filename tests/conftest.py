import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m mistral_compile ...` as a user would; returns CompletedProcess."""

    def run(*args, env=None, timeout=600, **kwargs):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([sys.executable, "-m", "mistral_compile", *map(str, args)],
                              capture_output=True, text=True, env=full_env, cwd=tmp_path,
                              timeout=timeout, **kwargs)

    return run


def tiny_checkpoint(path, cls="MistralForCausalLM", **overrides):
    """A random tiny checkpoint written by transformers itself (seed 0); returns the HF model.

    Default shape: hidden 64, 4 heads / 2 KV heads, 2 layers, vocab 256, window 16.
    """
    import torch
    import transformers

    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                 max_position_embeddings=512, sliding_window=16)
    torch.manual_seed(0)
    cfg = getattr(transformers, cls.replace("ForCausalLM", "Config"))(**{**shape, **overrides})
    model = getattr(transformers, cls)(cfg).eval()
    model.save_pretrained(path)
    return model
