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
