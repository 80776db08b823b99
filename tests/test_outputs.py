"""Outputs and loading: leftovers of killed runs, replacement said, permissions, verification."""

import json
import logging
import os
import stat

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import tiny_checkpoint  # noqa: E402

from mistral_compile.compiler.pipeline import compile_model  # noqa: E402
from mistral_compile.errors import MistralCompileError  # noqa: E402
from mistral_compile.runtime import Engine  # noqa: E402
from mistral_compile.weights import convert_weight  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    tiny_checkpoint(root / "hf")
    convert_weight(root / "hf", root / "model", "q0f32", progress=False)
    compile_model(root / "model", root / "lib.so")
    return root


def test_killed_runs_leftovers_are_removed_and_live_ones_kept(built, tmp_path, caplog):
    dead = tmp_path / ".out.partial-dead"
    live = tmp_path / ".out.partial-live"
    for folder, pid in ((dead, 2**22 + 12345), (live, os.getpid())):
        folder.mkdir()
        (folder / ".owner").write_text(str(pid))
    old = tmp_path / ".out.partial-old"  # an older version's leftover: no owner file
    old.mkdir()
    with caplog.at_level(logging.WARNING, logger="mistral_compile.weights"):
        convert_weight(built / "hf", tmp_path / "out", "q0f32", progress=False)
    assert not dead.exists() and not old.exists() and live.exists()
    assert "left by a conversion that did not finish" in caplog.text
    assert not (tmp_path / "out" / ".owner").exists()


def test_replacing_a_converted_model_is_said(built, tmp_path, caplog):
    convert_weight(built / "hf", tmp_path / "out", "q0f32", progress=False)
    with caplog.at_level(logging.WARNING, logger="mistral_compile.weights"):
        convert_weight(built / "hf", tmp_path / "out", "q0f32", progress=False)
    assert f"replacing the converted model in {tmp_path / 'out'}" in caplog.text


def test_outputs_get_the_umask_permissions(built):
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((built / "model").stat().st_mode) == 0o777 & ~mask
    for name in ("mistral-config.json", "mistral-weights.json"):
        assert stat.S_IMODE((built / "model" / name).stat().st_mode) == 0o666 & ~mask


def test_weights_are_checked_against_the_manifest(built, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(built / "model", model)
    shard = model / "params_shard_0.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte inside the data: same size
    shard.write_bytes(bytes(data))
    Engine(model, built / "lib.so")  # the size check passes; only the hash sees it
    with pytest.raises(MistralCompileError, match=r"params_shard_0\.safetensors: sha256 "
                       "differs from the manifest"):
        Engine(model, built / "lib.so", verify=True)
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(MistralCompileError, match=r"params_shard_0\.safetensors: \d+ bytes, "
                       r"the manifest says \d+"):
        Engine(model, built / "lib.so")
    manifest = json.loads((model / "mistral-weights.json").read_text())
    assert manifest["sizes"]["params_shard_0.safetensors"] == len(data)


def test_unwritable_outputs_are_one_line(run_cli, built):
    proc = run_cli("convert-weight", built / "hf", "-o", "/proc/nope/out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("mistral-compile: error: /proc/nope")
    proc = run_cli("compile", built / "model", "-o", "/proc/nope/lib.so")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "/proc/nope" in proc.stderr.strip().splitlines()[-1]
