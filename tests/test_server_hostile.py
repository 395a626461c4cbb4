"""The server under hostile input: every bad request gets one OpenAI-shaped error naming the
problem, a request can fail only itself, and nothing a client sends takes the server down.

A real server on 127.0.0.1 (the tiny random model of ``test_server``), driven by httpx and the
official ``openai`` client.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import llamakin
import llamakin.generation.sampling as sampling_module
from test_server import MODEL, Server, post, slow_down_steps, tiny, wait_until  # noqa: F401 (tiny: fixture)

openai = pytest.importorskip("openai")

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
PROMPTS = ["Story number 1:", "Story number 2:", "Story number 3:"]


@pytest.fixture(scope="module")
def server(tiny):  # noqa: F811
    s = Server(*tiny, max_batch=8, max_queue=64, context=256)
    yield s
    s.close()


def openai_error(response: httpx.Response, status: int) -> dict:
    """The error of an OpenAI-shaped error response with ``status``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].endswith("."), error
    return error


def stream_text(server, prompt: str, max_tokens: int = 24, **extra) -> tuple[str, list[dict]]:
    """Text and raw events of a streamed greedy completion."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        **extra,
    }
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            elif line == "data: [DONE]":
                events.append({"done": True})
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    return text, events


def alone(server, prompt: str, max_tokens: int = 24) -> str:
    r = post(
        server,
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# -- 1. per-request isolation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("seed", 2**70),
        ("seed", -(2**70)),
        ("temperature", 1e-45),
        ("temperature", 2.5),
        ("temperature", "1"),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("repetition_penalty", 0),
        ("repetition_penalty", 1e-300),
        ("frequency_penalty", 3),
        ("max_tokens", 2**70),
        ("stop", "x" * 5000),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stream", "yes"),
        ("ignore_eos", 1),
        ("n", 0),
        ("n", 10**6),
        ("logprobs", "yes"),
        ("top_logprobs", 10**6),
        ("logit_bias", {"1": 5}),
        ("tools", [{"type": "function"}]),
        ("tool_choice", "required"),
        ("tool_choice", "sometimes"),
        ("response_format", {"type": "xml"}),
        (
            "response_format",
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
        ),
        ("frobnicate", 1),
        ("guided_json", {"type": "object"}),
        ("stream_options", {"include_usage": True, "x": 1}),
    ],
)
def test_bad_field_is_a_400_naming_it(server, field, value):
    error = openai_error(post(server, "/v1/chat/completions", CHAT | {field: value}), 400)
    assert error["param"] is not None and error["param"].split(".")[0] == field, error
    assert error["type"] == "invalid_request_error"


def test_unknown_message_field_and_content_part_are_named(server):
    body = CHAT | {"messages": [{"role": "user", "content": "x", "nickname": "bob"}]}
    assert (
        openai_error(post(server, "/v1/chat/completions", body), 400)["param"]
        == "messages.0.nickname"
    )
    body = CHAT | {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ]
    }
    assert openai_error(post(server, "/v1/chat/completions", body), 400)["param"].startswith(
        "messages.0.content"
    )


def test_fields_that_do_not_change_the_answer_are_accepted(server):
    r = post(
        server,
        "/v1/chat/completions",
        CHAT
        | {
            "user": "u1",
            "metadata": {"a": "b"},
            "store": False,
            "response_format": {"type": "text"},
            "tool_choice": "none",
            "logprobs": False,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_hostile_requests_do_not_disturb_running_streams(server, monkeypatch):
    """Three streams decoding while the hostile requests of the issue arrive: every hostile one
    gets a 400 naming its field, every stream gets exactly the text it gets alone."""
    expected = [alone(server, p) for p in PROMPTS]
    slow_down_steps(server.engine, 0.02, monkeypatch)
    hostile = [
        CHAT | {"seed": 1180591620717411303424, "temperature": 0.7},
        CHAT | {"temperature": 1e-45},
    ]
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream_text, server, p) for p in PROMPTS]
        assert wait_until(lambda: server.engine.status()["running"] == 3)
        for body in hostile:
            error = openai_error(post(server, "/v1/chat/completions", body), 400)
            assert error["param"] in ("seed", "temperature")
        got = [s.result()[0] for s in streams]
    assert got == expected


def fail_sampling_for_seed(monkeypatch, seed: int, after: int) -> None:
    """Make sampling raise for the requests with ``seed`` once they have produced ``after`` tokens."""
    real = sampling_module.next_tokens
    calls: dict[int, int] = {}

    def sampling(logits, params, seen, generator, counts=None):
        if params.seed == seed:
            calls[id(generator)] = calls.get(id(generator), 0) + 1
            if calls[id(generator)] > after:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, seen, generator, counts)

    monkeypatch.setattr(sampling_module, "next_tokens", sampling)


def test_one_rows_sampling_failure_ends_that_request_alone(server, monkeypatch):
    """One row's sampling fails mid-generation: that stream ends with an OpenAI-shaped error
    event (and a non-streamed twin with a 500 of the same shape), the three other streams finish
    with exactly the text they get alone, and the server keeps serving."""
    expected = [alone(server, p) for p in PROMPTS]
    fail_sampling_for_seed(monkeypatch, seed=4242, after=3)
    slow_down_steps(server.engine, 0.02, monkeypatch)
    bad = {"prompt": "Doomed:", "temperature": 0.9, "seed": 4242}
    with ThreadPoolExecutor(5) as pool:
        streams = [pool.submit(stream_text, server, p) for p in PROMPTS]
        assert wait_until(lambda: server.engine.status()["running"] == 3)
        doomed = pool.submit(stream_text, server, bad.pop("prompt"), **bad)
        doomed_plain = pool.submit(
            post,
            server,
            "/v1/completions",
            {"model": MODEL, "prompt": "Doomed too:", "max_tokens": 24, **bad},
            timeout=120,
        )
        text, events = doomed.result()
        plain = doomed_plain.result()
        got = [s.result()[0] for s in streams]
    assert got == expected
    assert "error" in events[-1] and {"done": True} not in events, events[-3:]
    error = events[-1]["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert len(text) > 0  # it had produced tokens before failing
    assert openai_error(plain, 500)["code"] == "generation_failed"
    assert wait_until(lambda: server.engine.status()["running"] == 0)
    assert alone(server, PROMPTS[0]) == expected[0]


def test_one_rows_detokenizing_failure_ends_that_request_alone(server, monkeypatch):
    """Detokenizing one row fails mid-generation (its tokenizer call raises): that stream ends with
    an error event, the three others finish with exactly the text they get alone."""
    from llamakin.generation.text import TextStream

    expected = [alone(server, p) for p in PROMPTS]
    marker = "never-appears-7"  # the doomed request's stop string marks its text stream
    push = TextStream.push

    def failing(self, token_id):
        if marker in self.stop and len(self.ids) >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return push(self, token_id)

    monkeypatch.setattr(TextStream, "push", failing)
    slow_down_steps(server.engine, 0.02, monkeypatch)
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream_text, server, p) for p in PROMPTS]
        assert wait_until(lambda: server.engine.status()["running"] == 3)
        doomed = pool.submit(stream_text, server, "Doomed:", stop=[marker])
        _, events = doomed.result()
        got = [s.result()[0] for s in streams]
    assert got == expected
    assert "error" in events[-1] and {"done": True} not in events, events[-3:]
    assert "UnicodeDecodeError" in events[-1]["error"]["message"]
    assert wait_until(lambda: server.engine.status()["running"] == 0)


def test_a_failing_prefill_ends_that_request_alone(server, monkeypatch):
    expected = alone(server, PROMPTS[0])
    slow_down_steps(server.engine, 0.02, monkeypatch)
    prefill = server.engine._prefill

    def failing(request):
        if request.params.seed == 777:
            raise RuntimeError("prefill blew up")
        return prefill(request)

    monkeypatch.setattr(server.engine, "_prefill", failing)
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(stream_text, server, PROMPTS[0])
        assert wait_until(lambda: server.engine.status()["running"] == 1)
        r = post(
            server,
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "seed": 777, "max_tokens": 3},
            timeout=60,
        )
        assert stream.result()[0] == expected
    assert "prefill blew up" in openai_error(r, 500)["message"]


# -- 2. cancellation of non-streamed requests ---------------------------------------------------------
def test_non_streamed_requests_whose_clients_leave_are_cancelled(server, monkeypatch):
    """Six non-streamed requests of 200 tokens, dropped by their clients after 1 s: all six rows
    are freed within a few seconds instead of running to their end."""
    slow_down_steps(server.engine, 0.02, monkeypatch)  # 200 tokens: >= 4 s
    before = server.engine.status()["generated_tokens"]
    body = {
        "model": MODEL,
        "prompt": "A very long tale:",
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
    }

    def dropped(i):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + "/v1/completions",
                json=body | {"seed": i},
                timeout=httpx.Timeout(60, read=1.0),
            )

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(dropped, range(6)))
    assert wait_until(lambda: server.engine.status()["running"] == 0, seconds=3), (
        server.engine.status()
    )
    assert server.engine.status()["generated_tokens"] - before < 6 * 150


# -- 3. top_k, min_p, repetition_penalty are applied --------------------------------------------------
def test_top_k_one_is_greedy_at_any_temperature_and_seed(server):
    client = server.client(timeout=120)
    greedy = (
        client.completions.create(
            model=MODEL,
            prompt="The sea",
            max_tokens=10,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    texts = {
        client.completions.create(
            model=MODEL,
            prompt="The sea",
            max_tokens=10,
            temperature=1.5,
            seed=seed,
            extra_body={"top_k": 1, "ignore_eos": True},
        )
        .choices[0]
        .text
        for seed in range(5)
    }
    assert texts == {greedy}
    free = {
        client.completions.create(
            model=MODEL,
            prompt="The sea",
            max_tokens=10,
            temperature=1.5,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
        for seed in range(5)
    }
    assert len(free) > 1  # without top_k the seeds do differ


@pytest.fixture(scope="module")
def flat(tiny):  # noqa: F811
    """A server on a model whose next-token distributions are flat enough that top_k, min_p and
    repetition_penalty each change a sampled text (the module's model repeats one token)."""
    model, tok = tiny
    torch.manual_seed(1)
    flatter = llamakin.Transformer(model.config).eval()
    with torch.no_grad():
        flatter.embed.weight.normal_(0, 0.3)
    s = Server(flatter, tok, max_batch=4, context=128)
    yield s, flatter, tok
    s.close()


@pytest.mark.parametrize(
    "extra",
    [
        {"top_k": 5},
        {"min_p": 0.2},
        {"repetition_penalty": 1.5},
        {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.2, "top_p": 0.9},
    ],
)
def test_vllm_sampling_parameters_match_llamakin_generate(flat, extra):
    """Seeded sampling through the server equals :func:`llamakin.generate` with the same
    parameters (the same sampler, one generator per row), and differs from sampling without them."""
    server, model, tok = flat
    prompt, seed = "Once upon a time", 11
    client = server.client(timeout=120)

    def served(**fields):
        return (
            client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=16,
                temperature=1.0,
                seed=seed,
                top_p=fields.pop("top_p", 1.0),
                extra_body={"ignore_eos": True, **fields},
            )
            .choices[0]
            .text
        )

    expected = llamakin.generate(
        model, tok, prompt, max_new_tokens=16, temperature=1.0, seed=seed, ignore_eos=True, **extra
    )
    assert served(**extra) == expected
    assert served() != expected


# -- 5. error shapes ---------------------------------------------------------------------------------
def test_oversized_chunked_body_without_length_is_413(server):
    def chunks():
        for _ in range(32):
            yield b"x" * 65536  # 2 MB, no Content-Length: httpx sends it chunked

    r = httpx.post(
        server.url + "/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert (
        "content-length" not in r.request.headers
        and r.request.headers["transfer-encoding"] == "chunked"
    )
    assert openai_error(r, 413)["code"] == "request_too_large"


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (b'{"model": "tiny-test", "prompt": "\xff\xfe"}', "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "levels deep"),
        (b'{"a":' * 50 + b"1" + b"}" * 50, "levels deep"),
        (b'{"model": "tiny-test", "prompt": "x", "temperature": NaN}', "not valid JSON"),
        (b'{"model": "tiny-test", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "not valid JSON"),
    ],
)
def test_malformed_bodies_are_400(server, raw, fragment):
    error = openai_error(post(server, "/v1/completions", raw), 400)
    assert fragment in error["message"] and error["code"] == "invalid_json"


def test_unknown_path_and_wrong_method(server):
    error = openai_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert error["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert "GET" in openai_error(r, 405)["message"] and "POST" in r.headers["allow"]
    openai_error(httpx.delete(server.url + "/v1/models"), 405)


# -- 6. serve on a busy port or an unknown host --------------------------------------------------------
@pytest.mark.parametrize("case", ["busy port", "unknown host"])
def test_serve_cannot_bind_one_sentence_exit_2(case):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        host = "127.0.0.1" if case == "busy port" else "no-such-host.invalid"
        result = subprocess.run(
            [sys.executable, "-m", "llamakin.cli", "serve", "--host", host, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamakin: error: "), result.stderr
    assert ("already in use" if case == "busy port" else "does not resolve") in lines[0]


def test_server_keeps_serving_after_everything_above(server):
    assert server.client().models.list().data[0].id == MODEL
    assert server.engine.thread.is_alive()
    assert alone(server, "Still here?", max_tokens=3)
