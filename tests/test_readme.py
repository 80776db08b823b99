"""The README's tiny-model flow runs exactly as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent


def test_readme_tiny_flow_runs_as_written(tmp_path):
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- tiny-flow.*?-->\n```sh\n(.*?)```", text, re.S)
    assert block, "README lost its tiny-flow block"
    for name in ("examples", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    bindir = Path(sys.executable).parent
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.group(1)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens = re.findall(r"^\[([\d, ]+)\]$", proc.stdout, re.M)
    assert tokens and len(tokens[-1].split(",")) == 8
