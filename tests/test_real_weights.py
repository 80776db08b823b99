"""Real trained weights (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers, on the CPU.

transformers loads the same GGUF itself (its own dequantization, permutation and tokenizer);
our engine runs the file converted by convert-weight (fp32, full attention or a window).
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from terminal import Terminal  # noqa: E402

from mistral_compile.compiler.pipeline import compile_model  # noqa: E402
from mistral_compile.demo import GGUF_NAME  # noqa: E402
from mistral_compile.demo import smollm2_gguf as smollm_gguf  # noqa: E402
from mistral_compile.runtime import Engine  # noqa: E402
from mistral_compile.weights import convert_weight  # noqa: E402

W = 24  # the window set on the model for the windowed runs (prompts are 30-60 tokens)
STEPS = 32
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.fixture(scope="module")
def hf():
    path = smollm_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=GGUF_NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm")
    convert_weight(smollm_gguf(), root / "full", "q0f32", progress=False)
    compile_model(root / "full", root / "full.so")
    convert_weight(smollm_gguf(), root / "window", "q0f32", progress=False,
                   overrides={"sliding_window_size": W, "attention_sink_size": 0})
    compile_model(root / "window", root / "window.so")
    return root


def hf_windowed(model):
    """The same weights in transformers' MistralForCausalLM with sliding_window=W."""
    cfg = transformers.MistralConfig(**{**model.config.to_dict(), "model_type": "mistral",
                                        "sliding_window": W, "architectures": None})
    cfg._attn_implementation = "eager"
    windowed = transformers.MistralForCausalLM(cfg).eval()
    windowed.load_state_dict(model.state_dict())
    return windowed


def hf_greedy(model, ids):
    """STEPS argmax steps with the KV cache, through EOS (no stopping, no logits processors)."""
    out, tokens = None, []
    with torch.no_grad():
        step = torch.tensor([ids])
        for _ in range(STEPS):
            out = model(step, past_key_values=out.past_key_values if out else None,
                        use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]])
    return tokens


@pytest.mark.parametrize("kind", ["full", "window"])
def test_greedy_continuations_equal_transformers(hf, ours, kind):
    tok, model = hf
    ref = model if kind == "full" else hf_windowed(model)
    engine = Engine(ours / kind, ours / f"{kind}.so")
    for messages in PROMPTS:
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=True,
                                           return_dict=False))
        assert kind == "full" or len(ids) + STEPS > 2 * W  # the window really slides
        assert engine.generate(ids, STEPS) == hf_greedy(ref, ids)


def test_engine_chat_prompt_equals_apply_chat_template(hf, ours):
    tok, _ = hf
    engine = Engine(ours / "full", ours / "full.so")
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Capital of Italy? Ünïcödé ✓"}]
    stream = engine.chat(messages, temperature=0, max_tokens=4)
    list(stream)
    want = list(tok.apply_chat_template(messages, add_generation_prompt=True,
                                        return_dict=False))
    assert engine.tokens[:stream.usage.prompt_tokens] == want
    assert stream.text == tok.decode(stream.tokens, skip_special_tokens=True)
    for text in ("2024 is 12345 wörld 日本語 😀", "<|im_start|>user\nhi<|im_end|>", " lead"):
        assert engine.tokenizer.encode(text) == tok.encode(text)


def test_france_question_answered_in_a_terminal(ours):
    term = Terminal(ours / "full", "--lib", ours / "full.so", "--temperature", "0")
    term.expect(r">>> ")
    term.send("What is the capital of France?\n")
    answer = term.expect(r"France\?\r?\n(.*Paris.*)\r?\n", timeout=240)
    assert answer.group(1).strip().endswith(".")
    term.send("\x04")
    assert term.wait() == 0
