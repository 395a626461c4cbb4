"""``n > 1`` samples and prefix caching through a real server on 127.0.0.1 (the official client)."""

from __future__ import annotations

import httpx
import pytest

import llamakin
from llamakin.generation import derive_seed
from test_server import MODEL, Server, post, tiny  # noqa: F401 - tiny is a fixture
from conftest import finished_results

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tiny):  # noqa: F811
    s = Server(*tiny, max_batch=4, max_queue=16, context=256, prefix_cache_bytes=16 << 20)
    yield s
    s.close()


def test_n_samples_are_distinct_reproducible_and_seeded_from_the_request(server, tiny):  # noqa: F811
    model, tok = tiny
    client = server.client(timeout=120)
    ask = dict(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=10,
        temperature=2.0,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    answer = client.completions.create(n=3, **ask)
    texts = [c.text for c in answer.choices]
    assert [c.index for c in answer.choices] == [0, 1, 2] and len(set(texts)) == 3
    # the prompt counts once
    assert answer.usage.prompt_tokens == len(tok.encode("Once upon a time"))
    assert answer.usage.completion_tokens == 30
    assert [c.text for c in client.completions.create(n=3, **ask).choices] == texts  # reproducible
    # sample 0 is the request's seed
    assert client.completions.create(n=1, **ask).choices[0].text == texts[0]
    for index, text in enumerate(texts):  # sample j is llamakin.generate with the derived seed
        assert (
            llamakin.generate(
                model,
                tok,
                "Once upon a time",
                max_new_tokens=10,
                temperature=2.0,
                seed=derive_seed(5, index),
                ignore_eos=True,
            )
            == text
        )


def test_n_samples_of_a_chat_streamed_and_not(server):
    client = server.client(timeout=120)
    ask = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=8,
        temperature=1.0,
        seed=11,
        n=2,
    )
    plain = client.chat.completions.create(**ask)
    assert [c.index for c in plain.choices] == [0, 1]
    streamed, finish = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **ask
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == plain.usage.completion_tokens
    assert [streamed[0], streamed[1]] == [c.message.content for c in plain.choices]
    assert finish == {c.index: c.finish_reason for c in plain.choices}


def test_n_beyond_the_batch_or_out_of_range_is_a_400(server):
    for n in (5, 0, 10**6):
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "n": n})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_a_conversations_next_turn_reuses_the_previous_turns(server, tiny):  # noqa: F811
    model, tok = tiny
    client = server.client(timeout=120)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
    ]
    before = server.engine.status()["prefix_cache"]
    for question in ("And then?", "Tell me more"):
        answer = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content == llamakin.generate(
            model, tok, messages, max_new_tokens=8
        )
        messages += [
            {"role": "assistant", "content": answer.choices[0].message.content},
            {"role": "user", "content": question},
        ]
    after = server.engine.status()["prefix_cache"]
    assert (
        after["hits"] - before["hits"] >= 1
        and after["reused_tokens"] - before["reused_tokens"] >= 10
    )
    assert 0 < after["bytes"] <= after["budget_bytes"]
    metrics = httpx.get(server.url + "/metrics").text
    assert (
        "llamakin_prefix_cache_reused_tokens_total" in metrics
        and "llamakin_prefix_cache_bytes" in metrics
    )


def test_prefix_caching_off(tiny):  # noqa: F811
    s = Server(*tiny, max_batch=2, context=256, prefix_cache_bytes=0)
    try:
        assert "prefix_cache" not in s.engine.status()
        assert "llamakin_prefix_cache" not in httpx.get(s.url + "/metrics").text
    finally:
        s.close()


def test_per_row_logits_processors_reach_the_sampler(tiny):  # noqa: F811
    """The hook constrained decoding attaches to: each row (each of n samples) gets fresh processors
    from the request's factory, and they decide what is sampled."""
    import asyncio

    import torch

    from llamakin.generation import SamplingParams
    from llamakin.serve.engine import Engine, new_request

    model, tok = tiny
    allowed = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    allowed[tok.encode(" yes no maybe", add_special_tokens=False)] = True
    made = []

    def make_processors():
        seen = []
        made.append(seen)

        def only_allowed(generated, logits):
            seen.append(len(generated))
            return logits.masked_fill(~allowed, float("-inf"))

        return [only_allowed]

    async def serve():
        engine = Engine(model, tok, max_batch=4, context=128)
        request = new_request(
            tok.encode("Answer:"),
            SamplingParams(max_new_tokens=5, temperature=1.0, seed=1, ignore_eos=True),
            n=2,
            make_processors=make_processors,
        )
        engine.submit(request)
        results = await finished_results([request, *request.forks])
        engine.stop()
        return [r.token_ids for r in results]

    results = asyncio.run(serve())
    # one fresh list per sample
    assert len(made) == 2 and all(seen == [0, 1, 2, 3, 4] for seen in made)
    assert all(allowed[t] for ids in results for t in ids)
