"""Bad input, generated: every command ends in one line, no traceback, nothing left behind.

The contract (README): a command given bad input exits non-zero, its last stderr line is
``mistral-compile: error: ...`` naming the file and the field (or tensor), no traceback is
printed, and no output is left. Inputs are generated from good ones by seeded mutation:
config values, truncated and lying safetensors, truncated and flipped GGUF files, broken
tokenizer files, bad command-line values. A case may also be accepted; then its output must
be whole. The cases the issue found (its classes) are asserted to be refused.
"""

import json
import math
import shutil
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import CONFIGS, chatml_tokenizer, tiny_checkpoint  # noqa: E402

from mistral_compile.cli.main import main  # noqa: E402

RNG_SEED = 1234
BAD_VALUES = [None, 0, -1, -7, "x", 1.5, True, 10**40, math.nan, math.inf, [], {}, [1, 2]]
CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "num_hidden_layers", "rms_norm_eps", "vocab_size",
               "max_position_embeddings", "rope_theta", "sliding_window", "hidden_act",
               "tie_word_embeddings", "model_type", "architectures", "rope_scaling"]


def run(capsys, *argv):
    """The CLI in this process: (exit code, stderr). An exception escaping it fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


def assert_refused(code, err, out=None):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    if code == 2:  # argparse's usage error: "mistral-compile COMMAND: error: ..."
        assert lines and ": error: " in lines[-1], err
    else:  # ours: one line
        assert code == 1 and lines and lines[-1].startswith("mistral-compile: error: "), err
    if out is not None:
        assert not out.exists(), f"{out} left behind"
        assert not list(out.parent.glob(f".{out.name}*")), "partial output left behind"


def assert_outcome(code, err, out):
    """Accepted with a whole output, or refused by the contract."""
    if code == 0:
        assert "Traceback" not in err
        return
    assert_refused(code, err, out)


# ---------------------------------------------------------------- configs

def _write_config(path, data):
    # json.dumps writes NaN/Infinity for nan/inf, as a careless exporter would
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_config_values(tmp_path, capsys, key):
    base = json.loads((CONFIGS / "tiny-mistral.json").read_text())
    for i, value in enumerate(BAD_VALUES):
        data = dict(base)
        data[key] = value
        src = _write_config(tmp_path / f"c{i}.json", data)
        out = tmp_path / f"out{i}"
        code, err = run(capsys, "convert-config", src, "-o", out)
        assert_outcome(code, err, out)
        if code == 0:  # what was accepted is whole, valid JSON (no NaN)
            doc = json.loads((out / "mistral-config.json").read_text(),
                             parse_constant=lambda c: pytest.fail(f"{c} written"))
            assert doc["format"] == "mistral-compile-config"


@pytest.mark.parametrize("key, value", [
    ("rms_norm_eps", math.nan), ("rope_theta", math.inf), ("head_dim", 0),
    ("num_key_value_heads", 0), ("hidden_size", 10**40), ("vocab_size", 0),
])
def test_config_classes_from_the_issue_are_refused(tmp_path, capsys, key, value):
    data = json.loads((CONFIGS / "tiny-mistral.json").read_text())
    data[key] = value
    code, err = run(capsys, "convert-config", _write_config(tmp_path / "c.json", data),
                    "-o", tmp_path / "out")
    assert_refused(code, err, tmp_path / "out")
    assert key in err.strip().splitlines()[-1]


@pytest.mark.parametrize("flag, value", [("--prefill-chunk-size", 0),
                                         ("--sliding-window-size", 0),
                                         ("--context-window-size", 0),
                                         ("--attention-sink-size", -1),
                                         ("--max-batch-size", 0),
                                         ("--prefill-chunk-size", "x")])
def test_override_values(tmp_path, capsys, flag, value):
    code, err = run(capsys, "convert-config", CONFIGS / "tiny-mistral.json", "-o",
                    tmp_path / "out", flag, value)
    assert_refused(code, err, tmp_path / "out")


def test_config_symlink_loop(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").symlink_to(folder / "config.json")
    code, err = run(capsys, "convert-config", folder, "-o", tmp_path / "out")
    assert_refused(code, err, tmp_path / "out")
    assert "symbolic link that leads nowhere" in err


# ---------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_ckpt")
    tiny_checkpoint(root / "hf", num_hidden_layers=1)
    return root / "hf"


def _copy(checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dst)
    return dst


def test_truncated_safetensors(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(RNG_SEED)
    size = (checkpoint / "model.safetensors").stat().st_size
    (header,) = struct.unpack("<Q", (checkpoint / "model.safetensors").read_bytes()[:8])
    cuts = {1, 4, 8, 8 + header, 8 + header + 1, size // 2, size - 1,
            *(int(c) for c in rng.integers(1, size, 6))}
    for cut in sorted(cuts):
        ckpt = _copy(checkpoint, tmp_path)
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[:cut])
        out = tmp_path / "out"
        code, err = run(capsys, "convert-weight", ckpt, "-o", out, "--quantization", "q0f32")
        assert_refused(code, err, out)
        assert "model.safetensors" in err.strip().splitlines()[-1]
        shutil.rmtree(ckpt)


def test_lying_safetensors_headers(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(RNG_SEED)
    raw = (checkpoint / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    names = sorted(k for k in header if k != "__metadata__")
    cases = [struct.pack("<Q", 1 << 40) + raw[8:]]  # a header length far beyond the file
    for _ in range(12):
        lie = json.loads(json.dumps(header))
        name = names[int(rng.integers(len(names)))]
        kind = int(rng.integers(4))
        begin, end = lie[name]["data_offsets"]
        if kind == 0:  # past the end of the file
            lie[name]["data_offsets"] = [begin, end + len(raw)]
        elif kind == 1:  # overlapping another tensor
            other = names[(names.index(name) + 1) % len(names)]
            lie[name]["data_offsets"] = lie[other]["data_offsets"]
        elif kind == 2:  # a shape that does not fit the bytes
            lie[name]["shape"] = [d + 1 for d in lie[name]["shape"]]
        else:  # a dtype that does not fit the bytes
            lie[name]["dtype"] = "F64" if lie[name]["dtype"] != "F64" else "F16"
        blob = json.dumps(lie).encode()
        blob += b" " * (-len(blob) % 8)
        cases.append(struct.pack("<Q", len(blob)) + blob + raw[8 + size:])
    for case in cases:
        ckpt = _copy(checkpoint, tmp_path)
        (ckpt / "model.safetensors").write_bytes(case)
        out = tmp_path / "out"
        code, err = run(capsys, "convert-weight", ckpt, "-o", out, "--quantization", "q0f32")
        assert_refused(code, err, out)
        shutil.rmtree(ckpt)


def test_nan_weights_are_refused(checkpoint, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    ckpt = _copy(checkpoint, tmp_path)
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = sorted(tensors)[3]
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, str(ckpt / "model.safetensors"))
    code, err = run(capsys, "convert-weight", ckpt, "-o", tmp_path / "out")
    assert_refused(code, err, tmp_path / "out")
    assert "NaN or infinite" in err and name in err


def test_broken_tokenizer_files(checkpoint, tmp_path, capsys):
    breaks = {"tokenizer.json": ['{"model": ', "[]", '{"version": "1.0"}'],
              "tokenizer_config.json": ['{"chat_template": "{% for %}", "eos_token": "<|im_end|>"}',
                                        '{"eos_token": "<|nope|>"}', '{"eos_token": 7}', "[]"],
              "generation_config.json": ['{"eos_token_id": "x"}', "{"]}
    for fname, contents in breaks.items():
        for content in contents:
            ckpt = _copy(checkpoint, tmp_path)
            chatml_tokenizer(ckpt)
            (ckpt / fname).write_text(content)
            out = tmp_path / "out"
            code, err = run(capsys, "convert-weight", ckpt, "-o", out, "--quantization", "q0f32")
            assert_refused(code, err, out)
            assert fname in err.strip().splitlines()[-1], err
            shutil.rmtree(ckpt)


# ---------------------------------------------------------------- GGUF

@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from gguf_fixture import write_gguf

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=1, vocab_size=32000,
                                   max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return write_gguf(model, tmp_path_factory.mktemp("fuzz_gguf") / "m.gguf",
                      {"blk.0.ffn_up": "Q4_0"})


def test_truncated_and_flipped_gguf(gguf_file, tmp_path, capsys):
    rng = np.random.default_rng(RNG_SEED)
    raw = gguf_file.read_bytes()
    cases = [raw[:n] for n in (3, 24, 1000, len(raw) // 3, len(raw) - 1)]
    for _ in range(10):  # flipped bytes in the metadata (the first 1 MB holds the vocabulary)
        flipped = bytearray(raw)
        for pos in rng.integers(0, min(len(raw), 1 << 20), 4):
            flipped[int(pos)] ^= 0xFF
        cases.append(bytes(flipped))
    for i, case in enumerate(cases):
        path = tmp_path / f"case{i}.gguf"
        path.write_bytes(case)
        out = tmp_path / f"out{i}"
        code, err = run(capsys, "convert-weight", path, "-o", out, "--quantization", "q0f32")
        assert_outcome(code, err, out)
        if code:
            assert path.name in err.strip().splitlines()[-1] or "tokenizer" in err, err


# ---------------------------------------------------------------- command-line values

@pytest.mark.parametrize("argv", [
    ["compile", "MODEL", "-o", "OUT/l.so", "--device", "tpu"],
    ["compile", "MODEL", "-o", "OUT/l.so", "--arch", "sm_20", "--device", "cuda"],
    ["compile", "MODEL", "-o", "OUT/l.so", "--cpu", "pentium"],
    ["compile", "MODEL", "-o", "OUT/l.so", "--quantization", "q3f7"],
    ["compile", "MODEL", "-o", "OUT/l.so", "--cpu", "x86-64-v3", "--device", "cuda"],
    ["compile", "NOWHERE", "-o", "OUT/l.so"],
    ["bench", "MODEL", "--lib", "OUT/l.so", "--prefill-chunks", "-1"],
    ["bench", "MODEL", "--lib", "OUT/l.so", "--decode-steps", "0"],
    ["bench", "MODEL", "--lib", "OUT/l.so", "--contexts", "0"],
    ["chat", "MODEL", "--lib", "OUT/nope.so"],
    ["convert-weight", "NOWHERE", "-o", "OUT/w"],
    ["convert-weight", "MODEL", "-o", "OUT/w", "--quantization", "q8"],
    ["convert-config", "NOWHERE", "-o", "OUT/c"],
])
def test_bad_command_line_values(tmp_path, capsys, argv):
    from mistral_compile.config import convert_config

    convert_config(CONFIGS / "tiny-mistral.json", tmp_path / "model")
    out = tmp_path / "out"
    argv = [a.replace("MODEL", str(tmp_path / "model")).replace("NOWHERE", str(tmp_path / "no"))
            .replace("OUT", str(out)) for a in argv]
    code, err = run(capsys, *argv)
    assert_refused(code, err)
    assert not out.exists()
