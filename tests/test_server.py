"""The OpenAI-compatible server, on 127.0.0.1, driven by the official openai client and httpx."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import llamakin
from llamakin.serve import Engine, create_app
from assets import smollm2_gguf
from conftest import tiny_model

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
MODEL = "tiny-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, tokenizer, **options):
        engine_options = {
            k: options.pop(k)
            for k in ("max_batch", "max_queue", "context", "prefix_cache_bytes")
            if k in options
        }
        self.engine = Engine(model, tokenizer, **engine_options)
        app = create_app(self.engine, MODEL, **options)
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()


@pytest.fixture(scope="module")
def tiny():
    tok = llamakin.load_tokenizer(smollm2_gguf())
    return tiny_model(tok, max_position_embeddings=512), tok


@pytest.fixture(scope="module")
def server(tiny):
    s = Server(*tiny, max_batch=8, max_queue=64, context=256)
    yield s
    s.close()


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["context"] == 256


def test_completions_equal_llamakin_generate(server, tiny):
    model, tok = tiny
    expected = llamakin.generate(model, tok, "Once upon a time", max_new_tokens=12, ignore_eos=True)
    out = server.client().completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0
    )
    assert out.choices[0].text == expected or out.choices[0].finish_reason == "stop"
    assert expected.startswith(out.choices[0].text)
    assert out.usage.prompt_tokens == len(tok.encode("Once upon a time"))
    assert (
        out.usage.completion_tokens <= 12
        and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    )


def test_chat_plain_and_streaming(server, tiny):
    model, tok = tiny
    messages = [{"role": "user", "content": "Hello there"}]
    expected = llamakin.generate(model, tok, messages, max_new_tokens=10)
    client = server.client()
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    prompt_len = len(tok.encode(tok.apply_chat_template(messages), add_special_tokens=False))
    assert out.usage.prompt_tokens == prompt_len
    assert out.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-2].choices[0].finish_reason == out.choices[0].finish_reason
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_completions_streaming_ends_with_done(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True},
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings(server, tiny):
    model, tok = tiny
    full = llamakin.generate(model, tok, "The weather today", max_new_tokens=20, ignore_eos=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    out = server.client().completions.create(
        model=MODEL, prompt="The weather today", max_tokens=20, temperature=0, stop=[stop]
    )
    assert (
        out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"
    )


def test_sixteen_concurrent_streams_get_what_they_would_get_alone(server):
    prompts = [f"Story number {i}:" for i in range(16)]
    client = server.client(timeout=120)

    def alone(p):
        return (
            client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
            .choices[0]
            .text
        )

    expected = [alone(p) for p in prompts]

    def streamed(p):
        return "".join(
            c.choices[0].text
            for c in client.completions.create(
                model=MODEL, prompt=p, max_tokens=16, temperature=0, stream=True
            )
            if c.choices
        )

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(streamed, prompts))
    assert got == expected
    assert alone(prompts[0]) == expected[0]  # and it still answers


def post(server, path, body, **kw):
    return httpx.post(
        server.url + path,
        content=body if isinstance(body, (bytes, str)) else json.dumps(body),
        headers={"content-type": "application/json"},
        **kw,
    )


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0},
            400,
            "top_p",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0},
            400,
            "n",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}],
            },
            400,
            "tools.0.function",
        ),
        (
            "/v1/chat/completions",
            {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]},
            400,
            "messages",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 99}, 400, "logprobs"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "echo": True, "stream": True},
            400,
            "echo",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert server.client().models.list().data  # and the server keeps serving


def test_oversized_body(tiny):
    s = Server(*tiny, max_body_bytes=2000, context=128)
    try:
        r = post(s, "/v1/completions", {"model": MODEL, "prompt": "x" * 5000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    finally:
        s.close()


def test_api_key(tiny):
    s = Server(*tiny, api_key="sekret", context=128)
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(key="wrong").models.list()
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert s.client(key="sekret").models.list().data[0].id == MODEL
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.close()


def slow_down_steps(engine, seconds: float, monkeypatch) -> None:
    """Make every decode step of ``engine`` take ``seconds`` longer, so a test reaches engine
    states (a row running, a request waiting) deterministically instead of by a race."""
    step = engine._step
    monkeypatch.setattr(engine, "_step", lambda: (time.sleep(seconds), step())[1])


def wait_until(condition, seconds: float = 5.0) -> bool:
    """Poll ``condition`` every 10 ms for up to ``seconds``; whether it came true."""
    deadline = time.perf_counter() + seconds
    while not condition():
        if time.perf_counter() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_full_queue_answers_429_with_retry_after(tiny, monkeypatch):
    """One request running (max_batch=1), one waiting (max_queue=1): the next ones get 429 with
    Retry-After, the two admitted ones complete, and the server serves again afterwards."""
    s = Server(*tiny, max_batch=1, max_queue=1, context=256)
    slow_down_steps(s.engine, 0.01, monkeypatch)
    health = lambda: httpx.get(s.url + "/health").json()  # noqa: E731
    try:
        body = {"model": MODEL, "prompt": "Long story:", "max_tokens": 120, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, s, "/v1/completions", body, timeout=120)
            assert wait_until(lambda: health()["running"] == 1)
            waiting = pool.submit(post, s, "/v1/completions", body, timeout=120)
            assert wait_until(lambda: health()["waiting"] == 1)
            rejected = [post(s, "/v1/completions", body) for _ in range(3)]
            assert [r.status_code for r in rejected] == [429] * 3
            assert rejected[0].headers["retry-after"] == "1"
            assert rejected[0].json()["error"]["type"] == "rate_limit_error"
            assert running.result().status_code == 200 and waiting.result().status_code == 200
        assert post(s, "/v1/completions", body | {"max_tokens": 2}).status_code == 200
    finally:
        s.close()


def test_disconnect_mid_stream_frees_the_row(server, monkeypatch):
    slow_down_steps(server.engine, 0.02, monkeypatch)  # 200 tokens: >= 4 s
    before = server.engine.status()["generated_tokens"]
    body = {
        "model": MODEL,
        "prompt": "A very long tale:",
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # leaving the block closes the connection mid-stream
    assert wait_until(lambda: server.engine.status()["running"] == 0, seconds=3)
    # cancelled, not run to its end: far fewer than the 200 tokens it asked for
    assert server.engine.status()["generated_tokens"] - before < 150
    out = server.client().completions.create(
        model=MODEL, prompt="Still there?", max_tokens=4, temperature=0
    )
    assert out.usage.completion_tokens >= 1 or out.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_real_default_model_through_the_cli(tmp_path):
    import subprocess
    import sys

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llamakin.cli", "serve", "--port", str(port), "--max-batch", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not start: " + process.stderr.read())
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120
        )
        model = client.models.list().data[0].id
        assert model == "smollm2-135m-instruct"
        out = client.chat.completions.create(
            model=model,
            temperature=0,
            max_tokens=32,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert out.choices[0].message.content == "The capital of France is Paris."
        stream = client.completions.create(
            model=model,
            prompt="The capital of Germany is",
            max_tokens=6,
            temperature=0,
            stream=True,
        )
        assert "Berlin" in "".join(c.choices[0].text for c in stream if c.choices)
    finally:
        process.terminate()
        process.wait(timeout=30)
    # --quantize defaults to auto: the catalog file's Q4_1 projections run as int4, its Q8_0 head as int8
    assert (
        f"serving smollm2-135m-instruct (dtype float32, quantization int4 (group 32), int8, int8 embedding, "
        f"device cpu) at http://127.0.0.1:{port} " in process.stderr.read()
    )
