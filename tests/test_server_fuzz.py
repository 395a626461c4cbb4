"""Fuzzing the server's request handling with hypothesis (short budget; the long one is
``benchmarks/bench_fuzz_server.py``): every mutated body gets a 2xx or an OpenAI-shaped 4xx,
never a 5xx, and a stream running meanwhile gets exactly the text it gets alone."""

from __future__ import annotations

import os
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

import llamakin
from server_fuzz import MODEL, cases, check, send, tiny_model
from test_server import Server, post
from assets import smollm2_gguf

EXAMPLES = int(os.environ.get("LLAMAKIN_FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def fuzzed():
    tok = llamakin.load_tokenizer(smollm2_gguf())
    server = Server(tiny_model(tok), tok, max_batch=4, max_queue=64, context=64)
    body = {
        "model": MODEL,
        "prompt": "A calm sea",
        "max_tokens": 20,
        "temperature": 0,
        "ignore_eos": True,
    }
    expected = post(server, "/v1/completions", body, timeout=120).json()["choices"][0]["text"]
    stop, problems, streams = threading.Event(), [], [0]

    def bystander():
        """Streams the same request again and again while the fuzzing goes on."""
        while not stop.is_set():
            text = ""
            with httpx.stream(
                "POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=120
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        event = httpx.Response(200, content=line[6:]).json()
                        text += "".join(c["text"] for c in event.get("choices", []))
            streams[0] += 1
            if text != expected:
                problems.append(text)

    thread = threading.Thread(target=bystander, daemon=True)
    thread.start()
    client = httpx.Client(timeout=120)
    yield server, client
    stop.set()
    thread.join(timeout=120)
    client.close()
    server.close()
    assert streams[0] >= 1 and problems == [], problems


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(case=cases())
def test_mutated_requests_get_only_openai_shaped_client_errors(fuzzed, case):
    server, client = fuzzed
    check(send(client, server.url, case), case)
    assert server.engine.thread.is_alive()
