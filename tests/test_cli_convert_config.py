import json

import pytest
from conftest import CONFIGS


def tiny_hf(**over):
    base = json.loads((CONFIGS / "tiny-mistral.json").read_text())
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mistral-compile:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_directory_source_writes_normalized_config_and_summary(run_cli, tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    write(src / "config.json", tiny_hf())
    proc = run_cli("convert-config", src, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "sliding window    16" in proc.stdout and "prefill chunk     16" in proc.stdout
    doc = json.loads((tmp_path / "out" / "mistral-config.json").read_text())
    assert doc["config"]["context_window_size"] == -1
    assert "context_window_size = -1" in proc.stderr  # fallbacks are logged


def test_params_json_file_source_and_overrides(run_cli, tmp_path):
    proc = run_cli("convert-config", CONFIGS / "params-per-layer-window.json", "-o",
                   tmp_path / "out", "--attention-sink-size", "0", "--max-batch-size", "4",
                   "--prefill-chunk-size", "128")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp_path / "out" / "mistral-config.json").read_text())["config"]
    assert cfg["attention_sink_size"] == 0 and cfg["max_batch_size"] == 4
    assert cfg["prefill_chunk_size"] == 128
    assert -1 in cfg["layer_sliding_window_sizes"]


def test_python_dash_m_and_console_script_agree(run_cli, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("mistral-compile") or str(Path(sys.executable).parent /
                                                    "mistral-compile")
    out = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("mistral-compile ")
    assert run_cli("--version").stdout == out.stdout


BAD_INPUTS = [
    ("not json", '{"hidden_size": 4096,', "not valid JSON"),
    ("top level list", "[1, 2]", "expected a JSON object"),
    ("missing key", tiny_hf(vocab_size=...), "field 'vocab_size'"),
    ("wrong type", tiny_hf(num_hidden_layers="2"), "field 'num_hidden_layers'"),
    ("negative size", tiny_hf(intermediate_size=-128), "field 'intermediate_size'"),
    ("heads do not divide", tiny_hf(num_key_value_heads=3), "field 'num_key_value_heads'"),
    ("unknown model_type", tiny_hf(model_type="gpt2"), "field 'model_type'"),
    ("unknown architecture", tiny_hf(architectures=["GPT2LMHeadModel"]),
     "field 'architectures'"),
]


@pytest.mark.parametrize("name, content, needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_config_one_line_error_naming_file_and_nothing_written(run_cli, tmp_path, name,
                                                                   content, needle):
    src = write(tmp_path / "config.json", content)
    out = tmp_path / "out"
    proc = run_cli("convert-config", src, "-o", out)
    assert_one_line_error(proc, str(src), needle)
    assert not out.exists()


def test_sink_not_smaller_than_window(run_cli, tmp_path):
    src = write(tmp_path / "config.json", tiny_hf())
    proc = run_cli("convert-config", src, "-o", tmp_path / "out", "--attention-sink-size", "16")
    assert_one_line_error(proc, str(src), "field 'attention_sink_size'", "smaller than")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_directory(run_cli, tmp_path):
    src = write(tmp_path / "config.json", tiny_hf())
    blocker = write(tmp_path / "a-file", "x")
    proc = run_cli("convert-config", src, "-o", blocker / "sub")
    assert_one_line_error(proc, str(blocker / "sub"), "cannot create output directory")


def test_existing_output_is_replaced_atomically(run_cli, tmp_path):
    src = write(tmp_path / "config.json", tiny_hf())
    out = tmp_path / "out"
    assert run_cli("convert-config", src, "-o", out).returncode == 0
    first = (out / "mistral-config.json").read_text()
    write(src, tiny_hf(sliding_window=8))
    assert run_cli("convert-config", src, "-o", out).returncode == 0
    assert (out / "mistral-config.json").read_text() != first
    assert [p.name for p in out.iterdir()] == ["mistral-config.json"]  # no temp files left


def test_missing_source_and_empty_directory(run_cli, tmp_path):
    assert_one_line_error(run_cli("convert-config", tmp_path / "nope.json", "-o", tmp_path / "o"),
                          "no such file")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("convert-config", tmp_path / "empty", "-o", tmp_path / "o"),
                          "neither config.json nor params.json")


def make_hf_cache(root, repo_id, files):
    """Lay out a Hugging Face hub cache entry exactly as huggingface_hub writes one."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        write(snap / name, data)
    return snap


def test_repo_id_resolved_from_local_cache_only(run_cli, tmp_path):
    cache = tmp_path / "hub"
    make_hf_cache(cache, "someorg/tiny-mistral", {"config.json": tiny_hf()})
    env = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    proc = run_cli("convert-config", "someorg/tiny-mistral", "-o", tmp_path / "out", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "mistral-config.json").exists()
    # not cached: a clear error, at once (no network is touched: the run has a short timeout)
    proc = run_cli("convert-config", "someorg/not-cached", "-o", tmp_path / "out2", env=env,
                   timeout=60)
    assert_one_line_error(proc, "someorg/not-cached", "not in the local Hugging Face cache")
    assert not (tmp_path / "out2").exists()


def test_example_script_runs(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "examples" / "convert_config.py"),
                           str(CONFIGS / "mistral-7b-v0.1.json"), str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "attention sinks   0" in proc.stdout
    assert (tmp_path / "o" / "mistral-config.json").exists()


def test_cpu_levels_from_the_cpu_flags(tmp_path):
    from mistral_compile.compiler.devices import CPU_LEVELS, host_cpu_flags, native_cpu_level

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 bmi1 bmi2 f16c fma movbe\n")
    assert native_cpu_level(host_cpu_flags(info)) == "x86-64-v3"
    assert native_cpu_level(set(CPU_LEVELS["x86-64-v4"])) == "x86-64-v4"
    assert native_cpu_level({"sse2"}) == "x86-64"
    assert host_cpu_flags(tmp_path / "missing") == set()


def test_library_for_missing_cpu_features_is_one_line(tmp_path):
    from mistral_compile.errors import MistralCompileError
    from mistral_compile.runtime.library import check_cpu

    check_cpu(tmp_path / "lib.so", {"cpu_level": "x86-64", "cpu_flags": []})
    with pytest.raises(MistralCompileError, match=r"lib\.so: built for x86-64-v9, and this CPU "
                       r"lacks avx9000: compile it here \(--cpu native\)"):
        check_cpu(tmp_path / "lib.so", {"cpu_level": "x86-64-v9", "cpu_flags": ["avx9000"]})


def test_mixtral_config_converts_with_its_experts_in_the_summary(run_cli, tmp_path):
    # the config is read and its experts are reported (the CUDA compile of experts:
    # tests/test_mixtral.py::test_cuda_decode_reads_only_the_chosen_experts)
    out = tmp_path / "m"
    proc = run_cli("convert-config", CONFIGS / "mixtral-8x7b-v0.1.json", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "8 per layer, 2 per token" in proc.stdout + proc.stderr
    assert json.loads((out / "mistral-config.json").read_text())["config"]["num_local_experts"] == 8
