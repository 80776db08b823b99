"""The Hugging Face tokenizer family against transformers' own tokenizer on the same files."""

import json
import shutil

import pytest

transformers = pytest.importorskip("transformers")

from conftest import chatml_tokenizer  # noqa: E402

from mistral_compile.errors import MistralCompileError  # noqa: E402
from mistral_compile.tokenizer import HF, MISTRAL, choose_family, load_tokenizer  # noqa: E402
from mistral_compile.tokenizer.hf import HFTokenizer  # noqa: E402

TEXTS = ["The capital of France is Paris.", " leading space and  two", "日本語 émigré 😀!",
         "in-text <|im_end|> special and <|im_start|>user", ""]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 日本"}, {"role": "user", "content": "Again?"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chatml")
    chatml_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [299, 297]}))
    return path


def reference(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def test_encode_decode_equal_transformers(tok_dir):
    ours, ref = HFTokenizer(tok_dir), reference(tok_dir)
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, special) == ref.encode(text, add_special_tokens=special)
        ids = ref.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.size == len(ref) == 300


def test_chat_template_equals_apply_chat_template(tok_dir):
    ours, ref = HFTokenizer(tok_dir), reference(tok_dir)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                           return_dict=False)
            assert ours.encode_chat(messages, add_generation_prompt=gen) == list(want)
        want = ref.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True,
                                       tokenize=False)
        assert ours.render_chat(messages, TOOLS) == want and "get_weather" in want


def test_eos_ids_merge_tokenizer_and_generation_config(tok_dir):
    ours = HFTokenizer(tok_dir)
    assert ours.eos_id == 299 and ours.eos_ids == {299, 297} and ours.bos_id == 298


def test_bos_from_the_post_processor_as_transformers(tmp_path):
    from tokenizers import Tokenizer, processors

    chatml_tokenizer(tmp_path, add_bos_token=True)  # transformers 5 ignores the flag here
    ours, ref = HFTokenizer(tmp_path), reference(tmp_path)
    assert ours.encode("Hello") == ref.encode("Hello") != [298, *ref.encode("Hello")]
    backend = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 298)])
    backend.save(str(tmp_path / "tokenizer.json"))
    ours, ref = HFTokenizer(tmp_path), reference(tmp_path)
    assert ours.encode("Hello")[0] == 298 and ours.encode("Hello") == ref.encode("Hello")
    assert ours.encode("Hello", False) == ref.encode("Hello", add_special_tokens=False)


def test_stream_decoder_byte_level_multibyte(tok_dir):
    ours = HFTokenizer(tok_dir)
    text = "日本語 émigré 😀 and more 🙂"
    ids = ours.encode(text, add_special_tokens=False)
    assert any("\ufffd" in ours.decode([i]) for i in ids)  # some characters span tokens
    dec = ours.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def test_answer_tail_is_what_follows_the_answer(tok_dir):
    ours = HFTokenizer(tok_dir)
    messages = CONVERSATIONS[1]
    tail = ours.answer_tail(messages)
    full = ours.encode_chat(messages)
    assert tail[0] == 299 and full[len(full) - len(tail):] == tail
    assert ours.decode(tail, False) == "<|im_end|>\n<|im_start|>user\nAgain?<|im_end|>\n" \
        "<|im_start|>assistant\n"


def test_bad_files_are_one_line_errors(tmp_path):
    chatml_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(MistralCompileError, match=r"tokenizer\.json: not a tokenizer\.json"):
        HFTokenizer(tmp_path)
    chatml_tokenizer(tmp_path, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(MistralCompileError, match=r"tokenizer_config\.json: field "
                       "'chat_template': the template raised: no system role"):
        HFTokenizer(tmp_path).encode_chat(CONVERSATIONS[0])
    chatml_tokenizer(tmp_path, chat_template="{% for m in messages %}")
    with pytest.raises(MistralCompileError, match=r"tokenizer_config\.json: field "
                       "'chat_template': does not parse"):
        HFTokenizer(tmp_path)
    chatml_tokenizer(tmp_path, eos_token="<|nope|>")
    with pytest.raises(MistralCompileError, match="field 'eos_token': '<|nope|>' is not in"):
        HFTokenizer(tmp_path)
    chatml_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(MistralCompileError, match="has no chat template"):
        HFTokenizer(tmp_path).encode_chat(CONVERSATIONS[0])


def test_family_rule(tmp_path, tok_dir):
    import mistral_common

    data = tmp_path.parent / "x"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(tok_dir, data)
    assert choose_family(data) == HF
    v3 = (tmp_path.parent / "x" / "tokenizer.model.v3")
    spm = __import__("pathlib").Path(mistral_common.__file__).parent / "data"
    shutil.copy(spm / "tokenizer.model.v1", data / "tokenizer.model")
    assert choose_family(data) == HF  # plain SentencePiece next to tokenizer.json: hf
    shutil.copy(spm / "mistral_instruct_tokenizer_240323.model.v3", v3)
    assert choose_family(data) == MISTRAL  # a Mistral file wins ...
    assert choose_family(data, HF) == HF  # ... unless hf is asked for
    (data / "tokenizer.json").unlink()
    (data / "tokenizer.model.v3").unlink()
    assert choose_family(data) == MISTRAL
    with pytest.raises(MistralCompileError, match="tokenizer.json: --tokenizer hf needs"):
        choose_family(data, HF)
    (data / "tokenizer.model").unlink()
    assert choose_family(data) is None
    with pytest.raises(MistralCompileError, match="no tokenizer"):
        load_tokenizer(data, {"family": None, "files": [], "version": None}, 300)


def test_vocabulary_must_fit_the_model(tok_dir):
    with pytest.raises(MistralCompileError, match="ids up to 299, the model's vocab_size is 256"):
        load_tokenizer(tok_dir, {"family": HF}, 256)
    assert load_tokenizer(tok_dir, {"family": HF}, 320).size == 300


def test_engine_chat_with_an_hf_tokenizer(tmp_path):
    """A fine-tune as people ship it: tokenizer.json + ChatML template, EOS <|im_end|>."""
    from conftest import tiny_checkpoint

    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.runtime import Engine
    from mistral_compile.weights import convert_weight

    tiny_checkpoint(tmp_path / "hf", vocab_size=300, sliding_window=None)
    chatml_tokenizer(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text('{"eos_token_id": [299]}')
    convert_weight(tmp_path / "hf", tmp_path / "model", "q0f32", progress=False)
    manifest = json.loads((tmp_path / "model" / "mistral-weights.json").read_text())
    assert manifest["tokenizer"] == {"family": "hf", "version": None,
                                     "files": ["tokenizer.json", "tokenizer_config.json",
                                               "generation_config.json"]}
    compile_model(tmp_path / "model", tmp_path / "lib.so")
    eng = Engine(tmp_path / "model", tmp_path / "lib.so")
    ref = reference(tmp_path / "hf")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    first = eng.chat(msgs, max_tokens=6, temperature=0)
    text = "".join(first)
    want = list(ref.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False))
    assert eng.tokens[:len(want)] == want and first.usage.prompt_tokens == len(want)
    assert text == ref.decode(first.tokens, skip_special_tokens=True)
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "And Spain?"}]
    second = eng.chat(msgs, max_tokens=6, temperature=0)
    list(second)
    # the generated tokens stay; the template's <|im_end|>\n and the new turn follow them
    tail = ref.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    tail = list(tail)[len(ref.apply_chat_template(msgs[:2], return_dict=False)) - 2:]
    assert eng.tokens[:second.usage.prompt_tokens] == want + first.tokens + tail
    assert second.usage.prefilled_tokens == len(tail) + 1  # + the last generated token
