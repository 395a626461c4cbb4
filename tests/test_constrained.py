"""Constrained decoding (``llamakin.constrained``) and ``response_format`` on the server.

The grammar side is checked against things nobody here wrote: Python's ``json`` parser and
``jsonschema`` validate every constrained output, and the real SmolLM2 tokenizer provides the
vocabulary. The end-to-end tests drive a real server on 127.0.0.1 with the official ``openai``
client and the tiny random model of ``test_server`` at temperature 1.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

import llamakin
from llamakin.constrained import ConstraintError, Grammar
from test_server import MODEL, Server, post, tiny  # noqa: F401 (tiny: fixture)

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
    },
    "required": ["name", "age", "member", "tags", "score"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny):  # noqa: F811
    s = Server(*tiny, max_batch=4, context=256)
    yield s
    s.close()


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


# -- the logits processor on its own ------------------------------------------------------------------
def test_eos_only_when_the_json_is_complete(tiny):  # noqa: F811
    model, tok = tiny
    eos = tok.eos_token_ids[0]
    constraint = Grammar.json(tok, None, model.config.vocab_size).constraint()
    first = constraint.allowed([])
    assert not first[eos]
    assert first.any() and all(tok.decode([int(i)]).startswith("{") for i in first.nonzero())
    unfinished = _ids(tok, '{"a": [1, 2')
    assert not constraint.allowed(unfinished)[eos] and not constraint.is_complete(unfinished)
    finished = _ids(tok, '{"a": [1, 2]}')
    allowed = constraint.allowed(finished)
    assert (
        constraint.is_complete(finished)
        and allowed[eos]
        and allowed.sum() == len(tok.eos_token_ids)
    )


def test_masked_logits_keep_allowed_values_and_drop_the_rest(tiny):  # noqa: F811
    model, tok = tiny
    constraint = Grammar.json(tok, {"type": "boolean"}, model.config.vocab_size).constraint()
    logits = torch.randn(model.config.vocab_size)
    masked = constraint([], logits)
    kept = torch.isfinite(masked)
    assert torch.equal(masked[kept], logits[kept])
    assert all(
        "true".startswith(tok.decode([int(i)])) or "false".startswith(tok.decode([int(i)]))
        for i in kept.nonzero()
    )


def _sample_with_preference(
    tok, constraint, preferred: str, steps: int, generator
) -> tuple[str, bool]:
    """Sample ``steps`` tokens whose logits favour the tokens of ``preferred`` (a text that is NOT
    valid JSON) strongly, plus noise; only the constraint stands between it and invalid output."""
    vocab = constraint.vocab_size
    favoured = torch.zeros(vocab)
    favoured[_ids(tok, preferred)] = 8.0
    out: list[int] = []
    for _ in range(steps):
        logits = constraint(out, favoured + torch.randn(vocab, generator=generator))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if token in tok.eos_token_ids:
            return tok.decode(out), True
        out.append(token)
    return tok.decode(out), False


@pytest.mark.parametrize("preferred", ['{"a": 1,} trailing', "not json at all", '{"age": tru'])
def test_a_model_that_wants_invalid_json_writes_valid_json(tiny, preferred):  # noqa: F811
    model, tok = tiny
    grammar = Grammar.json(tok, PERSON, model.config.vocab_size)
    for seed in range(2):
        text, ended = _sample_with_preference(
            tok, grammar.constraint(), preferred, 200, torch.Generator().manual_seed(seed)
        )
        assert ended, text
        jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize(
    "schema,fragment",
    [
        ({"type": "object", "not": {"required": ["a"]}}, "not"),
        ({"type": "string", "if": {"maxLength": 2}, "then": {"pattern": "a"}}, "if"),
        ({"$ref": "#/definitions/missing"}, "missing"),
        ({"type": "wizard"}, "wizard"),
    ],
)
def test_schemas_that_cannot_be_enforced_are_refused_naming_the_problem(tiny, schema, fragment):  # noqa: F811
    model, tok = tiny
    with pytest.raises(ConstraintError, match=fragment):
        Grammar.json(tok, schema, model.config.vocab_size)


def test_generate_takes_the_constraint(tiny):  # noqa: F811
    model, tok = tiny
    grammar = Grammar.json(tok, PERSON, model.config.vocab_size)
    for seed in range(2):
        text = llamakin.generate(
            model,
            tok,
            "Describe a person:",
            max_new_tokens=120,
            temperature=1.0,
            seed=seed,
            logits_processor=grammar.constraint(),
        )
        jsonschema.validate(json.loads(text), PERSON)


# -- response_format on the server --------------------------------------------------------------------
def test_json_schema_responses_parse_and_validate(server):
    client = server.client(timeout=120)
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for seed in range(4):
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "A person, as JSON"}],
            temperature=1.0,
            seed=seed,
            max_tokens=150,
            response_format=response_format,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_streamed_equals_whole(server):
    client = server.client(timeout=120)
    body = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON"}],
        temperature=1.0,
        seed=7,
        max_tokens=150,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    whole = client.chat.completions.create(**body).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**body, stream=True)
        if c.choices
    )
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), PERSON)


def test_json_object_mode_starts_an_object_and_stops_at_max_tokens_with_length(server):
    client = server.client(timeout=120)
    for seed in range(3):
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "JSON"}],
            seed=seed,
            temperature=1.0,
            max_tokens=6,
            response_format={"type": "json_object"},
        )
        choice = out.choices[0]
        assert choice.message.content.startswith("{"), choice
        if choice.finish_reason == "length":  # cut off mid-document: never a complete-looking lie
            with pytest.raises(json.JSONDecodeError):
                json.loads(choice.message.content)
        else:
            assert isinstance(json.loads(choice.message.content), dict)


def test_unconstrained_answers_are_unchanged(server, tiny):  # noqa: F811
    model, tok = tiny
    messages = [{"role": "user", "content": "Hello there"}]
    expected = llamakin.generate(model, tok, messages, max_new_tokens=10)
    out = server.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        response_format={"type": "text"},
    )
    assert out.choices[0].message.content == expected


@pytest.mark.parametrize(
    "response_format,fragment",
    [
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "not": {"type": "null"}}},
            },
            '"not"',
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": "zero"}},
            },
            "",
        ),
        ({"type": "xml"}, ""),
        ({"type": "json_schema"}, ""),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, ""),
    ],
)
def test_bad_response_formats_are_400s(server, response_format, fragment):
    r = post(
        server,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": response_format,
        },
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].split(".")[0] == "response_format" and fragment in error["message"], error
    assert httpx.get(server.url + "/health").status_code == 200


def test_response_format_with_ignore_eos_is_refused(server):
    r = post(
        server,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "ignore_eos": True,
            "response_format": {"type": "json_object"},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos", r.text
