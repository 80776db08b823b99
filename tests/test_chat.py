"""Chat: the streaming API over a tiny random model with a real Mistral tokenizer, and the REPL."""

import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_checkpoint  # noqa: E402
from terminal import Terminal  # noqa: E402

from mistral_compile.compiler.pipeline import compile_model  # noqa: E402
from mistral_compile.errors import MistralCompileError  # noqa: E402
from mistral_compile.runtime import Engine  # noqa: E402
from mistral_compile.weights import convert_weight  # noqa: E402

W = 32


def v3_tokenizer_file():
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data",
                        "mistral_instruct_tokenizer_240323.model.v3")


def build(root, sliding_window, context):
    tiny_checkpoint(root / "hf", vocab_size=32768, max_position_embeddings=context,
                    sliding_window=sliding_window, bos_token_id=1, eos_token_id=2)
    shutil.copy(v3_tokenizer_file(), root / "hf" / "tokenizer.model.v3")
    convert_weight(root / "hf", root / "model", "q0f32", progress=False)
    compile_model(root / "model", root / "lib.so")
    return root


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return build(tmp_path_factory.mktemp("chat_full"), None, 160)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    return build(tmp_path_factory.mktemp("chat_window"), W, 4096)


def engine(root, **kw):
    return Engine(root / "model", root / "lib.so", **kw)


def test_stream_pieces_usage_and_seeds(full):
    eng = engine(full)
    msgs = [{"role": "user", "content": "Hello there"}]
    stream = eng.chat(msgs, max_tokens=12, temperature=0.8, seed=3)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == stream.text
    u = stream.usage
    assert (u.completion_tokens, u.finish_reason) == (12, "length")
    assert u.prompt_tokens == u.prefilled_tokens == len(eng.tokens) - 11
    eng.reset()
    assert list(eng.chat(msgs, max_tokens=12, temperature=0.8, seed=3)) == pieces
    eng.reset()
    other = "".join(eng.chat(msgs, max_tokens=12, temperature=0.8, seed=4))
    assert other != stream.text


def test_follow_up_turn_reuses_the_cache_exactly(full):
    eng = engine(full)
    msgs = [{"role": "user", "content": "Hello there"}]
    first = eng.chat(msgs, max_tokens=10, temperature=0)
    msgs.append({"role": "assistant", "content": "".join(first)})
    msgs.append({"role": "user", "content": "Tell me more"})
    second = eng.chat(msgs, max_tokens=10, temperature=0)
    text = "".join(second)
    # only the last answer token, EOS and the new user turn were prefilled
    assert second.usage.prefilled_tokens < 12 < second.usage.prompt_tokens
    # same answer as a fresh engine fed the whole prompt at once
    prompt = eng.tokens[:second.usage.prompt_tokens]
    fresh = engine(full)
    assert fresh.generate(prompt, 10) == second.tokens
    assert text == second.text


def test_stop_strings_end_the_answer_before_them(full):
    eng = engine(full)
    msgs = [{"role": "user", "content": "Count"}]
    text = "".join(eng.chat(msgs, max_tokens=20, temperature=0))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    eng.reset()
    stream = eng.chat(msgs, max_tokens=20, temperature=0, stop=[stop])
    got = "".join(stream)
    assert got == text[:text.index(stop)] and stream.usage.finish_reason == "stop"


def test_context_limit_ends_the_answer_then_refuses(full):
    eng = engine(full)
    msgs = [{"role": "user", "content": "Hello"}]
    stream = eng.chat(msgs, temperature=0)
    list(stream)
    assert stream.usage.finish_reason == "context" and eng.length == 160
    msgs += [{"role": "assistant", "content": stream.text}, {"role": "user", "content": "more"}]
    with pytest.raises(MistralCompileError, match="exceeds the context window"):
        list(eng.chat(msgs, temperature=0))


def test_windowed_chat_goes_past_the_window(windowed):
    eng = engine(windowed, attention_sink_size=4)
    msgs = []
    for turn in range(4):
        msgs.append({"role": "user", "content": f"turn {turn}"})
        stream = eng.chat(msgs, max_tokens=2 * W, temperature=0.7, seed=turn)
        msgs.append({"role": "assistant", "content": "".join(stream)})
    assert eng.length > 6 * W and eng.capacity < 3 * W


def test_tokenizer_chosen_from_file_or_recorded_version(full, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(full / "model", model)
    manifest = json.loads((model / "mistral-weights.json").read_text())
    assert manifest["tokenizer"] == {"family": "mistral-common", "files": ["tokenizer.model.v3"],
                                     "version": "v3"}
    (model / "tokenizer.model.v3").unlink()  # as if converted without it (not in the manifest)
    for key in ("files", "sizes"):
        del manifest[key]["tokenizer.model.v3"]
    (model / "mistral-weights.json").write_text(json.dumps(manifest))
    # no file: the recorded version selects mistral-common's bundled v3
    assert engine(full).tokenizer.size == 32768
    eng = Engine(model, full / "lib.so")
    assert eng.tokenizer.size == 32768 and "bundled v3" in eng.tokenizer.source
    manifest["tokenizer"] = {"family": None, "files": [], "version": None}
    (model / "mistral-weights.json").write_text(json.dumps(manifest))
    with pytest.raises(MistralCompileError, match="no tokenizer"):
        Engine(model, full / "lib.so").tokenizer  # noqa: B018
    manifest["tokenizer"]["version"] = "v1"  # 32000 tokens for a 32768-token model
    (model / "mistral-weights.json").write_text(json.dumps(manifest))
    with pytest.raises(MistralCompileError, match="32000 tokens, the model's vocab_size is 32768"):
        Engine(model, full / "lib.so").tokenizer  # noqa: B018


def test_repl_streams_reuses_resets_and_survives_ctrl_c(windowed):
    root = windowed
    term = Terminal(root / "model", "--lib", root / "lib.so", "--seed", "1",
                    "--attention-sink-size", "0")
    term.expect(r">>> ")
    term.send("hello there\n")
    # no --max-tokens and a window: the answer would go on; it must show before it ends
    term.expect(r"hello there\r?\n[\s\S]{20,}", timeout=60)  # an answer may open with newlines
    term.send("\x03")
    term.expect(r"\[stopped\]\r?\n>>> $")
    term.send("/stats\n")
    first = term.expect(r"prompt (\d+) tokens, prefilled (\d+)")
    assert first.group(1) == first.group(2)
    term.out = ""
    term.send("and again\n")
    term.expect(r"and again\r?\n[\s\S]{5,}")
    term.send("\x03")
    term.expect(r"\[stopped\]\r?\n>>> $")
    term.send("/stats\n")
    second = term.expect(r"prompt (\d+) tokens, prefilled (\d+)")
    assert int(second.group(2)) < int(second.group(1)) // 2  # the first turn came from cache
    term.send("/reset\n")
    term.expect(r"\(conversation reset\)")
    term.send("/help\n")
    term.expect(r"/stats")
    term.send("\x04")  # Ctrl-D at the prompt
    assert term.wait() == 0


def test_chat_with_a_missing_library_is_one_line(run_cli, full, tmp_path):
    proc = run_cli("chat", full / "model", "--lib", tmp_path / "nope.so", input="")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("nope.so: library not found")
