"""convert-weight and compile through the CLI: the flow a user runs, and its bad inputs."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from conftest import tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpt") / "hf"
    tiny_checkpoint(root)
    return root


def test_flow_convert_weight_then_compile(run_cli, hf_dir, tmp_path):
    proc = run_cli("convert-weight", hf_dir, "-o", tmp_path / "m", "--quantization", "q0f16")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "m" / "mistral-weights.json").read_text())
    assert manifest["dtype"] == "float16" and "mistral-config.json" in manifest["files"]
    names = [p["name"] for p in manifest["params"]]
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.1.mlp.gate_up_proj.weight" in names
    proc = run_cli("compile", tmp_path / "m", "-o", tmp_path / "lib.so")
    assert proc.returncode == 0, proc.stderr
    assert "build" in proc.stdout and (tmp_path / "lib.so").stat().st_size > 0


def corrupt(hf_dir, tmp_path, change):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "config.json").write_text((hf_dir / "config.json").read_text())
    from mistral_compile.weights.safetensors_io import SafetensorsFile

    f = SafetensorsFile(hf_dir / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(src / "model.safetensors"))
    return src


@pytest.mark.parametrize("change, needle", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
     "tensor 'model.layers.1.self_attn.k_proj.weight' is missing"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((64, 64), "float32")}),
     "'model.layers.0.mlp.up_proj.weight' has shape [64, 64]"),
    (lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3, "float32")}),
     "unexpected tensor 'model.layers.9.extra.weight'"),
    (lambda t: t.update({"model.norm.weight": np.zeros(64, "int32")}),
     "has dtype I32"),
], ids=["missing", "misshapen", "leftover", "dtype"])
def test_bad_checkpoints_fail_naming_the_tensor_and_leave_nothing(run_cli, hf_dir, tmp_path,
                                                                  change, needle):
    src = corrupt(hf_dir, tmp_path, change)
    proc = run_cli("convert-weight", src, "-o", tmp_path / "out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_pickle_refused_without_flag(run_cli, tmp_path):
    src = tmp_path / "pk"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"x")
    proc = run_cli("convert-weight", src, "-o", tmp_path / "out")
    assert proc.returncode == 1 and "--allow-pickle" in proc.stderr


def test_pickle_read_with_flag_equals_safetensors(run_cli, hf_dir, tmp_path):
    # the same (bf16) tensors as pytorch_model.bin and as model.safetensors convert identically
    from mistral_compile.weights.safetensors_io import SafetensorsFile

    f = SafetensorsFile(hf_dir / "model.safetensors")
    state = {k: torch.from_numpy(np.array(f.get(k))).to(torch.bfloat16) for k in f.keys()}
    pk, st = tmp_path / "pk", tmp_path / "st"
    for d in (pk, st):
        d.mkdir()
        (d / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(state, pk / "pytorch_model.bin")
    from safetensors.torch import save_file as save_torch

    save_torch(state, str(st / "model.safetensors"))
    assert run_cli("convert-weight", pk, "-o", tmp_path / "a", "--allow-pickle").returncode == 0
    assert run_cli("convert-weight", st, "-o", tmp_path / "b").returncode == 0
    a = json.loads((tmp_path / "a" / "mistral-weights.json").read_text())
    b = json.loads((tmp_path / "b" / "mistral-weights.json").read_text())
    shards = [n for n in a["files"] if n.startswith("params_shard")]
    assert shards and all(a["files"][n] == b["files"][n] for n in shards)


def test_config_flag_and_overrides(run_cli, hf_dir, tmp_path):
    # overrides given to convert-weight reach the converted config; --config excludes them
    proc = run_cli("convert-weight", hf_dir, "-o", tmp_path / "m", "--attention-sink-size", "2")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp_path / "m" / "mistral-config.json").read_text())
    assert cfg["config"]["attention_sink_size"] == 2
    proc = run_cli("convert-weight", hf_dir, "-o", tmp_path / "n", "--config", tmp_path / "m",
                   "--attention-sink-size", "0")
    assert proc.returncode == 1 and "cannot be combined" in proc.stderr
    assert not (tmp_path / "n").exists()
