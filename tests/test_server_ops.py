"""The server's operational endpoints: /metrics (read back with prometheus_client's own parser),
/tokenize and /detokenize (llama.cpp's and vLLM's request shapes), the startup line."""

from __future__ import annotations

import copy
import threading

import httpx
import pytest
import torch

from llamakin.serve import startup_line
from llamakin.serve.metrics import weights_summary
from test_server import MODEL, Server, slow_down_steps, tiny, wait_until  # noqa: F401 - tiny is a fixture

parser = pytest.importorskip("prometheus_client.parser")


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as ``{(name, sorted labels): value}``."""
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith(
        "text/plain; version=0.0.4"
    )
    samples = {}
    for family in parser.text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture()
def server(tiny):  # noqa: F811 - a fresh server: its counters start at zero
    s = Server(*tiny, max_batch=4, max_queue=8, context=256)
    yield s
    s.close()


def test_metrics_count_requests_tokens_and_latencies(server, tiny):  # noqa: F811
    model, tok = tiny
    client = server.client()
    prompts = ["Once upon a time", "The weather today"]
    out = client.completions.create(
        model=MODEL, prompt=prompts[0], max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    stream = client.completions.create(
        model=MODEL,
        prompt=prompts[1],
        max_tokens=7,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    streamed = [c for c in stream]
    assert out.usage.completion_tokens == 5 and streamed[-1].choices[0].finish_reason == "length"
    assert (
        httpx.post(
            server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 5}
        ).status_code
        == 400
    )
    assert (
        httpx.post(
            server.url + "/v1/completions", json={"model": "other", "prompt": "x"}
        ).status_code
        == 404
    )
    assert httpx.get(server.url + "/nowhere").status_code == 404

    m = scrape(server)
    requests = "llamakin_http_requests_total"
    assert value(m, requests, endpoint="/v1/completions", status="200") == 2
    assert value(m, requests, endpoint="/v1/completions", status="400") == 1
    assert value(m, requests, endpoint="/v1/completions", status="404") == 1
    assert value(m, requests, endpoint="other", status="404") == 1
    assert value(m, "llamakin_request_finished_total", reason="length") == 2
    assert value(m, "llamakin_prompt_tokens_total") == sum(len(tok.encode(p)) for p in prompts)
    assert value(m, "llamakin_generation_tokens_total") == 5 + 7
    # one first token per request; every later token is one inter-token interval
    assert value(m, "llamakin_time_to_first_token_seconds_count") == 2
    assert value(m, "llamakin_time_per_output_token_seconds_count") == (5 - 1) + (7 - 1)
    assert value(m, "llamakin_time_to_first_token_seconds_sum") > 0
    assert value(m, "llamakin_time_to_first_token_seconds_bucket", le="+Inf") == 2
    assert value(m, "llamakin_requests_running") == 0 and value(m, "llamakin_requests_waiting") == 0
    assert (
        value(m, "llamakin_kv_cache_used_tokens") == 0
        and value(m, "llamakin_kv_cache_usage_ratio") == 0
    )
    assert value(m, "llamakin_kv_cache_capacity_tokens") == 4 * 256
    c = model.config
    assert (
        value(m, "llamakin_kv_cache_bytes")
        == 2 * c.num_layers * 4 * c.num_kv_heads * 256 * c.head_dim * 4
    )
    assert (
        value(
            m,
            "llamakin_model_info",
            model=MODEL,
            dtype="float32",
            quantization="none",
            device="cpu",
        )
        == 1
    )
    # the first scrape, counted
    assert value(scrape(server), requests, endpoint="/metrics", status="200") == 1


def test_metrics_while_a_request_runs(server, tiny, monkeypatch):  # noqa: F811
    _, tok = tiny
    slow_down_steps(server.engine, 0.02, monkeypatch)
    prompt = "A very long tale:"
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 60,
        "temperature": 0,
        "ignore_eos": True,
    }
    worker = threading.Thread(
        target=lambda: httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    )
    worker.start()
    try:
        assert wait_until(lambda: server.engine.status()["generated_tokens"] >= 5)
        m = scrape(server)
        assert value(m, "llamakin_requests_running") == 1
        used = value(m, "llamakin_kv_cache_used_tokens")
        assert len(tok.encode(prompt)) < used < len(tok.encode(prompt)) + 60
        assert value(m, "llamakin_kv_cache_usage_ratio") == pytest.approx(used / (4 * 256))
    finally:
        worker.join(timeout=60)
    assert value(scrape(server), "llamakin_request_finished_total", reason="length") == 1


def test_tokenize_and_detokenize_in_llama_cpp_and_vllm_shapes(server, tiny):  # noqa: F811
    _, tok = tiny
    text = "Hello world, tokenize me!"
    post = lambda path, body: httpx.post(server.url + path, json=body)  # noqa: E731

    # llama.cpp: {"content"} without special tokens by default; pieces on request
    r = post("/tokenize", {"content": text})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(text, add_special_tokens=False)
    pieces = post("/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == r.json()["tokens"] and "".join(
        p["piece"] for p in pieces
    ) == text
    assert post("/tokenize", {"content": text, "add_special": True}).json()["tokens"] == tok.encode(
        text
    )
    assert post("/detokenize", {"tokens": r.json()["tokens"]}).json()["content"] == text

    # vLLM: {"prompt"} with special tokens by default, count and max_model_len; {"messages"} as chat renders them
    r = post("/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert (
        r["tokens"] == tok.encode(text)
        and r["count"] == len(r["tokens"])
        and r["max_model_len"] == 256
    )
    assert r["token_strs"] == [tok.id_to_token(i) for i in r["tokens"]]
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": text}]
    r = post("/tokenize", {"model": MODEL, "messages": messages}).json()
    chat = server.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1, temperature=0
    )
    # the same prompt the chat endpoint generates from
    assert r["count"] == chat.usage.prompt_tokens
    assert r["tokens"] == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert post("/detokenize", {"model": MODEL, "tokens": r["tokens"]}).json()[
        "prompt"
    ] == tok.decode(r["tokens"])

    # bad requests: OpenAI-shaped 400s and 404s naming the problem
    for path, body, status, param in [
        ("/tokenize", {"content": "a", "prompt": "b"}, 400, None),
        ("/tokenize", {}, 400, None),
        ("/tokenize", {"content": 5}, 400, "content"),
        (
            "/tokenize",
            {"content": "a", "add_special": True, "add_special_tokens": False},
            400,
            None,
        ),
        ("/tokenize", {"content": "a", "colour": 1}, 400, "colour"),
        ("/tokenize", {"model": "other", "content": "a"}, 404, "model"),
        ("/detokenize", {"tokens": [1, tok.vocab_size]}, 400, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ]:
        r = post(path, body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"].endswith("."), (
            r.json()
        )
    assert "exactly one of 'content'" in post("/tokenize", {}).json()["error"]["message"]


def test_api_key_guards_tokenize_but_not_metrics_or_the_page(tiny):  # noqa: F811
    s = Server(*tiny, context=256, api_key="sesame")
    try:
        assert httpx.post(s.url + "/tokenize", json={"content": "a"}).status_code == 401
        assert httpx.post(s.url + "/detokenize", json={"tokens": [1]}).status_code == 401
        ok = httpx.post(
            s.url + "/tokenize", json={"content": "a"}, headers={"Authorization": "Bearer sesame"}
        )
        assert ok.status_code == 200
        assert (
            httpx.get(s.url + "/metrics").status_code == 200
            and httpx.get(s.url + "/").status_code == 200
        )
        assert (
            value(scrape(s), "llamakin_http_requests_total", endpoint="/tokenize", status="401")
            == 1
        )
    finally:
        s.close()


def test_startup_line_names_model_dtype_quantization_and_address(tiny):  # noqa: F811
    model, _ = tiny

    class Limits:
        max_batch, max_queue, context = 8, 64, 2048

    line = startup_line(model, "tiny", "127.0.0.1", 8123, Limits())
    assert line.startswith(
        "llamakin: serving tiny (dtype float32, quantization none, device cpu) at "
        "http://127.0.0.1:8123 "
    )
    assert "http://[::1]:8000" in startup_line(model, "tiny", "::1", 8000, Limits())
    half = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert weights_summary(half) == ("bfloat16", "none")
    quantized = torch.nn.Module()
    quantized.register_buffer("weight", torch.zeros(4, 4, dtype=torch.int8))
    quantized.register_buffer("scale", torch.ones(4))
    assert weights_summary(quantized) == ("float32", "int8")
    from llamakin.quant.model import quantize_model

    int4 = quantize_model(copy.deepcopy(model), "int4", group_size=32)
    dtype, quantization = weights_summary(int4)
    assert dtype == "float32" and quantization.startswith("int4 (group 32)"), quantization
