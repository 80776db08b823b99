"""`mistral-compile generate`: JSONL in, batched, JSONL out in input order (CPU, tiny model)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import chatml_tokenizer, tiny_checkpoint  # noqa: E402

W = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.weights import convert_weight

    root = tmp_path_factory.mktemp("generate")
    ref = tiny_checkpoint(root / "hf", vocab_size=300, sliding_window=W, rope_theta=10000.0,
                          attn_implementation="eager")
    chatml_tokenizer(root / "hf")
    convert_weight(root / "hf", root / "model", "q0f32", progress=False)
    compile_model(root / "model", root / "lib.so")
    tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    return ref, tok, root


def hf_greedy(ref, prompt, max_tokens, eos):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(ref(torch.tensor([tokens])).logits[0, -1].argmax())
            tokens.append(nxt)
            if nxt in eos:
                break
    return tokens[len(prompt):]


def write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines)
                    + "\n")


def test_outputs_in_input_order_equal_hf_greedy(model, run_cli, tmp_path):
    ref, tok, root = model
    rng = np.random.default_rng(0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    lines = [{"id": "ids", "prompt_token_ids": rng.integers(3, 290, 70).tolist(),
              "max_tokens": 9, "ignore_eos": True},
             {"prompt": "Hello, world! How are you", "max_tokens": 5},
             {"id": 7, "messages": messages, "max_tokens": 12},
             {"prompt_token_ids": [5], "max_tokens": 20, "ignore_eos": True},
             {"id": "sampled", "prompt": "Sliding windows", "temperature": 0.8, "seed": 3,
              "max_tokens": 6, "logprobs": 2}]
    write(tmp_path / "in.jsonl", lines)
    done = run_cli("generate", root / "model", "--lib", root / "lib.so", "--input",
                   tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl",
                   "--max-batch-size", "3", "--prefill-chunk-size", "8",
                   "--max-num-batched-tokens", "10")
    assert done.returncode == 0, done.stderr
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == ["ids", 2, 7, 4, "sampled"]
    eos = {tok.convert_tokens_to_ids("<|im_end|>")}
    prompts = [lines[0]["prompt_token_ids"], tok.encode(lines[1]["prompt"]),
               tok.apply_chat_template(messages, add_generation_prompt=True,
                                       return_dict=False), [5]]
    for o, line, prompt in zip(out, lines, prompts, strict=False):
        want = hf_greedy(ref, prompt, line["max_tokens"], set() if line.get("ignore_eos")
                         else eos)
        assert o["token_ids"] == want
        assert o["text"] == tok.decode([t for t in want if t not in eos],
                                       skip_special_tokens=True)
        assert o["usage"]["prompt_tokens"] == len(prompt)
        assert o["usage"]["completion_tokens"] == len(want)
        assert o["finish_reason"] == ("stop" if want[-1] in eos and not line.get("ignore_eos")
                                      else "length")
    sampled = out[4]
    assert len(sampled["logprobs"]) == len(sampled["token_ids"]) == 6
    assert all(len(e["top"]) == 2 and e["logprob"] <= 0 for e in sampled["logprobs"])
    assert "Hello" not in done.stdout  # results went to the file


def test_stop_strings_cut_the_text(model, run_cli, tmp_path):
    ref, tok, root = model
    write(tmp_path / "in.jsonl", [{"prompt": "The capital", "max_tokens": 30,
                                   "ignore_eos": True}])
    args = ["generate", root / "model", "--lib", root / "lib.so", "--input",
            tmp_path / "in.jsonl"]
    full = json.loads(run_cli(*args).stdout)
    text = full["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2 and stop.strip()
    cut = json.loads(run_cli(*args, "--stop", stop).stdout)
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[:text.find(stop)]


BAD = [
    ("not json", "{nope", "not JSON"),
    ("two prompts", {"prompt": "a", "prompt_token_ids": [1]}, "exactly one of"),
    ("temperature", {"prompt": "a", "temperature": "hot"}, "'temperature' must be a number"),
    ("token id", {"prompt_token_ids": [1, 999]}, "999 is outside the vocabulary"),
    ("top_p", {"prompt": "a", "top_p": 2}, "top_p=2.0: must be in (0, 1]"),
    ("logit_bias", {"prompt": "a", "logit_bias": {"x": 1}}, "'logit_bias' keys"),
    ("messages", {"messages": "hi"}, "'messages' must be a list"),
    ("logprobs", {"prompt": "a", "logprobs": 21}, "logprobs=21"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_a_bad_line_is_one_error_naming_it(model, run_cli, tmp_path, case):
    _, _, root = model
    _, line, message = case
    write(tmp_path / "in.jsonl", [{"prompt": "fine"}, line])
    done = run_cli("generate", root / "model", "--lib", root / "lib.so", "--input",
                   tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl")
    assert done.returncode == 1
    errors = [x for x in done.stderr.splitlines() if "error" in x]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "in.jsonl:2: " in errors[0] and message in errors[0], errors[0]
    assert not (tmp_path / "out.jsonl").exists()


def test_engine_arguments_reach_the_engine_config():
    from mistral_compile.cli.args import engine_config
    from mistral_compile.cli.main import build_parser

    args = build_parser().parse_args(["generate", "m", "--lib", "l.so", "--input", "x.jsonl",
                                      "--max-num-batched-tokens", "12", "--no-cuda-graphs",
                                      "--no-prefix-caching", "--max-batch-size", "5",
                                      "--attention-sink-size", "4"])
    cfg = engine_config(args)
    assert (cfg.max_step_tokens, cfg.cuda_graphs, cfg.prefix_caching, cfg.max_batch_size,
            cfg.attention_sink_size) == (12, False, False, 5, 4)
    default = engine_config(build_parser().parse_args(["generate", "m", "--lib", "l.so",
                                                       "--input", "x.jsonl"]))
    assert (default.max_step_tokens, default.cuda_graphs, default.attention_sink_size) == \
        (None, True, 0)
