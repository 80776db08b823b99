"""`mistral-compile serve` with the official openai client, a real server process on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

from conftest import chatml_tokenizer, tiny_checkpoint  # noqa: E402

KEY = "sk-test-key"
NAME = "tiny-chat"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.weights import convert_weight

    root = tmp_path_factory.mktemp("serve")
    tiny_checkpoint(root / "hf", vocab_size=300, sliding_window=None,
                    max_position_embeddings=256)
    chatml_tokenizer(root / "hf")
    convert_weight(root / "hf", root / "model", "q0f32", progress=False)
    compile_model(root / "model", root / "lib.so")
    return root


def start(root, *extra):
    """A server process on a free port; (process, base URL) once /health answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistral_compile", "serve", root / "model", "--lib",
         root / "lib.so", "--port", str(port), "--served-model-name", NAME, *extra],
        env={**__import__("os").environ, "MISTRAL_COMPILE_API_KEY": KEY},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read()) from None
            time.sleep(0.1)
    return proc, base


@pytest.fixture(scope="module")
def server(model):
    proc, base = start(model, "--max-batch-size", "8")
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    yield base, openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert KEY not in out  # the key never reaches a log line
    assert "Traceback" not in out, out[-3000:]
    for _ in range(100):  # the engine process ends with the server, even on a signal
        if not any(os.path.exists(f"/proc/{pid}") for pid in children):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the engine process outlived the server: {children}")


def chat(client, content, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user",
                                                                 "content": content}],
                                          temperature=0, **kw)


def metric(base, name):
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")


def test_models_and_health(server):
    base, client = server
    assert [m.id for m in client.models.list()] == [NAME]
    assert json.loads(urllib.request.urlopen(base + "/health").read()) == {"status": "ok"}


def test_chat_streaming_equals_non_streaming(server):
    _, client = server
    whole = chat(client, "Hello, world!", max_tokens=12)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5
    pieces, usage, reasons = [], None, []
    for chunk in chat(client, "Hello, world!", max_tokens=12, stream=True,
                      stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == choice.message.content
    assert reasons[-1] == choice.finish_reason and usage.completion_tokens == \
        whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt: the prefix cache


def test_completions_with_text_ids_and_logprobs(server):
    _, client = server
    text = client.completions.create(model=NAME, prompt="The capital of France", max_tokens=8,
                                     temperature=0, logprobs=3)
    c = text.choices[0]
    assert text.usage.completion_tokens == 8 and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == 8 and all(lp <= 0 for lp in c.logprobs.token_logprobs)
    # greedy: the chosen token is the likeliest (tokens decoding alike share a key, as in vLLM)
    for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and abs(max(top.values()) - lp) < 1e-5
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=NAME, prompt="The capital of France", max_tokens=8, temperature=0, stream=True))
    assert streamed == c.text
    ids = client.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 4


def test_concurrent_requests_equal_their_sequential_answers(server):
    _, client = server
    prompts = [f"Tell me about item {i} and the weather." for i in range(16)]
    alone = [chat(client, p, max_tokens=10).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: chat(client, p, max_tokens=10)
                                 .choices[0].message.content, prompts))
    assert together == alone


def test_seeded_sampling_and_n(server):
    _, client = server
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
              temperature=1.0, seed=5)
    a = client.chat.completions.create(**kw, n=2)
    b = client.chat.completions.create(**kw, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2


def test_a_closed_stream_frees_its_sequence(server):
    base, client = server
    stream = chat(client, "Sliding windows keep the cache small.", max_tokens=200, stream=True,
                  extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    for _ in range(100):
        if metric(base, "mistral_compile_requests_running") == 0 and \
                metric(base, "mistral_compile_kv_pages_in_use") == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the closed stream's sequence kept running")
    assert chat(client, "Still there?", max_tokens=3).choices[0].finish_reason
    assert metric(base, "mistral_compile_generation_tokens_total") > 0
    assert metric(base, "mistral_compile_time_to_first_token_seconds_count") > 0


def post(base, path, body, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


ERRORS = [
    ("no key", {"model": NAME, "messages": [{"role": "user", "content": "x"}]}, None, 401),
    ("wrong key", {"model": NAME, "messages": [{"role": "user", "content": "x"}]}, "sk-no", 401),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, KEY,
     404),
    ("temperature", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                     "temperature": -1}, KEY, 400),
    ("top_p", {"model": NAME, "prompt": "x", "top_p": 3}, KEY, 400),
    ("token id", {"model": NAME, "prompt": [1, 10**6]}, KEY, 400),
    ("no messages", {"model": NAME}, KEY, 400),
    ("too long", {"model": NAME, "prompt": [5] * 300}, KEY, 400),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_errors_in_openai_shape(server, case):
    base, _ = server
    _, body, key, status = case
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    code, answer = post(base, path, body, key)
    assert code == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["message"]


def test_an_oversized_body_is_413(server):
    # the server answers from the Content-Length header, before reading the body
    base, _ = server
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: "
                     f"Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: "
                     f"{9 << 20}\r\n\r\n".encode())
        conn.settimeout(10)
        answer = b""
        while b'"error"' not in answer:  # headers and body may come in separate reads
            piece = conn.recv(65536)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413") and b'"error"' in answer


def test_without_a_tokenizer_every_token_streams_as_ids(model, tmp_path):
    # serve --random-weights on a model without a tokenizer (load tests of a shape):
    # completions of token ids, each streamed chunk carrying its step's ids (a load client
    # times every token by them)
    from mistral_compile.weights import convert_weight

    root = tmp_path / "bare"
    shutil.copytree(model / "hf", root / "hf",
                    ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    convert_weight(root / "hf", root / "model", "q0f32", progress=False)
    (root / "lib.so").symlink_to(model / "lib.so")  # the same config: the same library
    proc, base = start(root, "--random-weights")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        prompt = [5, 17, 42, 7]
        whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=6,
                                          temperature=0, extra_body={"ignore_eos": True})
        ids = whole.choices[0].model_extra["token_ids"]
        assert len(ids) == 6 and whole.choices[0].text == ""
        chunks = [c.choices[0].model_extra["token_ids"] for c in client.completions.create(
            model=NAME, prompt=prompt, max_tokens=6, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices]
        assert [i for c in chunks for i in c] == ids
        assert len([c for c in chunks if c]) == 6  # one chunk per token, not one at the end
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def windowed_model(tmp_path_factory):
    """The same tiny model with a window of 16: no context end, so requests can run long."""
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.weights import convert_weight

    root = tmp_path_factory.mktemp("serve_windowed")
    tiny_checkpoint(root / "hf", vocab_size=300, sliding_window=16)
    chatml_tokenizer(root / "hf")
    convert_weight(root / "hf", root / "model", "q0f32", progress=False)
    compile_model(root / "model", root / "lib.so")
    return root


def test_a_full_queue_is_503_with_retry_after(windowed_model):
    # one long request running, one waiting: the next one is turned away at once; closing the
    # two streams then cancels them
    proc, base = start(windowed_model, "--max-batch-size", "1", "--max-queue", "1")
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    try:
        streams = [client.completions.create(model=NAME, prompt="x", max_tokens=100000,
                                             temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
                   for _ in range(2)]
        next(iter(streams[0]))  # the first is running
        for _ in range(200):
            if metric(base, "mistral_compile_requests_waiting") >= 1:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the second request never waited")
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model=NAME, prompt="y", max_tokens=2)
        assert err.value.status_code == 503
        assert err.value.response.headers["retry-after"]
        for stream in streams:
            stream.close()
        for _ in range(200):
            if metric(base, "mistral_compile_requests_running") + \
                    metric(base, "mistral_compile_requests_waiting") == 0:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the closed streams kept their sequences")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_the_engine_thread_serves_the_same_answer(model, server):
    # serve --engine-thread: the engine on a thread of the server's process (no child process)
    # answers as the engine process does
    _, client = server
    want = chat(client, "Hello, world!", max_tokens=8).choices[0].message.content
    proc, base = start(model, "--engine-thread")
    try:
        assert subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split() == []
        other = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        assert chat(other, "Hello, world!", max_tokens=8).choices[0].message.content == want
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_a_tensor_parallel_model_serves_the_same_answer(model, server, tmp_path):
    # serve on a 2-shard library: the engine process starts the second shard's process
    # (runtime/shards.py), and both end with the server
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.weights import convert_weight

    root = tmp_path / "two"
    convert_weight(model / "hf", root / "model", "q0f32", progress=False,
                   overrides={"tensor_parallel_shards": 2})
    compile_model(root / "model", root / "lib.so")
    _, one = server
    want = chat(one, "Hello there", max_tokens=12).choices[0].message.content
    proc, base = start(root)
    try:
        engine = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                text=True).stdout.split()  # the engine (and a resource tracker)
        shards = subprocess.run(["pgrep", "-P", ",".join(engine)], capture_output=True,
                                text=True).stdout.split()
        assert shards  # the engine's second shard
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        got = chat(client, "Hello there", max_tokens=12)
        assert got.choices[0].message.content == want
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "Traceback" not in out, out[-3000:]
    for _ in range(100):
        if not any(os.path.exists(f"/proc/{pid}") for pid in engine + shards):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"a shard's process outlived the server: {engine + shards}")


def test_a_dead_engine_process_fails_requests_and_health(model):
    # the engine runs in a process of its own: if it dies, /health says so (503) and a request
    # gets an error at once instead of waiting forever
    import signal

    proc, base = start(model)
    try:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert children  # the engine process
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
            except urllib.error.HTTPError as err:
                assert err.code == 503 and "engine down" in err.read().decode()
                break
            time.sleep(0.05)
        else:
            raise AssertionError("/health kept answering ok")
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=10)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model=NAME, prompt="x", max_tokens=2)
        assert err.value.status_code == 500 and "engine process is gone" in str(err.value)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
