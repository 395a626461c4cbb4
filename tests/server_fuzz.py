"""Hostile request bodies for the server, as hypothesis strategies, and the one rule they must obey.

Shared by ``tests/test_server_fuzz.py`` (a short budget in ``make test``) and
``benchmarks/bench_fuzz_server.py`` (a long one). A case starts from a valid chat or completion
request and mutates it: fields set to arbitrary JSON or to boundary values (huge integers,
subnormal floats, wrong types), fields dropped, unknown fields added, messages and prompts
mangled, and the serialized bytes truncated, spliced with garbage or invalid UTF-8; some cases
go to other paths and methods. :func:`check` is the rule: the answer is a 2xx with a well-formed
body, or one of the 4xx the API documents with OpenAI's error shape; never a 5xx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
from hypothesis import strategies as st

MODEL = "tiny-test"
ALLOWED_ERRORS = {400, 404, 405, 413, 422, 429}

KNOWN_FIELDS = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "ignore_eos",
    "echo",
    "suffix",
    "best_of",
    "tools",
    "tool_choice",
    "functions",
    "response_format",
    "user",
    "metadata",
    "messages",
    "prompt",
]
BOUNDARY_VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    2**31,
    2**63,
    2**64,
    2**70,
    -(2**70),
    0.0,
    -0.0,
    1e-45,
    5e-324,
    1e-5,
    0.5,
    1.0,
    1.9999,
    2.0000001,
    1e308,
    -1e308,
    "",
    "1",
    "0.5",
    "x" * 2000,
    "\u0000",
    "\ud800",
    [],
    {},
    [1],
    ["a"] * 5,
    {"type": "text"},
    {"include_usage": True},
    {"include_usage": "1"},
]

# values inside (or at the edge of) each field's valid range: these reach the sampler
VALID = {
    "temperature": st.sampled_from([0.0, 1e-5, 2.0]) | st.floats(0, 2),
    "top_p": st.sampled_from([1e-9, 1.0]) | st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 2**70),
    "min_p": st.floats(0, 1, exclude_max=True),
    "repetition_penalty": st.floats(0.01, 100),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "seed": st.sampled_from([-(2**63), 2**64 - 1, 0]) | st.integers(-(2**63), 2**64 - 1),
    "max_tokens": st.integers(1, 70),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
}

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
field_value = st.sampled_from(BOUNDARY_VALUES) | json_value
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "wizard", ""]),
        "content": st.text(max_size=40)
        | st.none()
        | st.lists(
            st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["text", "image_url"]),
                    "text": st.text(max_size=20) | json_leaf,
                }
            ),
            max_size=3,
        ),
    },
    optional={"name": st.text(max_size=5), "extra": json_value},
)
prompt = (
    st.text(max_size=60)
    | st.lists(st.integers(min_value=-5, max_value=60000), max_size=8)
    | st.lists(st.text(max_size=10), max_size=3)
    | json_value
)


@dataclass
class Case:
    method: str
    path: str
    body: bytes

    def __repr__(self) -> str:
        return f"Case({self.method} {self.path} {self.body[:300]!r}{'...' if len(self.body) > 300 else ''})"


def _base(chat: bool) -> dict:
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "Hi"
    return body


@st.composite
def cases(draw) -> Case:
    chat = draw(st.booleans())
    body = _base(chat)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(
            st.sampled_from(
                ["valid", "valid", "set", "set", "drop", "unknown", "messages", "prompt"]
            )
        )
        if action == "valid":
            name = draw(st.sampled_from(sorted(VALID)))
            body[name] = draw(VALID[name])
        elif action == "set":
            body[draw(st.sampled_from(KNOWN_FIELDS))] = draw(field_value)
        elif action == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif action == "unknown":
            body[draw(st.text(min_size=1, max_size=12))] = draw(field_value)
        elif action == "messages":
            body["messages"] = draw(st.lists(message, max_size=3) | json_value)
        else:
            body["prompt"] = draw(prompt)
    raw = json.dumps(body, allow_nan=False).encode("utf-8", "surrogatepass")
    damage = draw(
        st.sampled_from(
            ["none"] * 12 + ["truncate", "splice", "bad utf-8", "deep", "not an object"]
        )
    )
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "splice":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:]
    elif damage == "bad utf-8":
        at = draw(st.integers(0, len(raw)))
        raw = (
            raw[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]))
            + raw[at:]
        )
    elif damage == "deep":
        depth = draw(st.sampled_from([40, 1000, 100_000]))
        raw = raw[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    elif damage == "not an object":
        raw = json.dumps([body]).encode("utf-8", "surrogatepass")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    method = "POST"
    elsewhere = [
        ("GET", path),
        ("PUT", path),
        ("POST", "/v1/models"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/../etc/passwd"),
        ("POST", "/v1/chat/completions/"),
        ("POST", "//v1/completions"),
    ]
    method, path = draw(st.sampled_from([(method, path)] * 3 * len(elsewhere) + elsewhere))
    return Case(method, path, raw)


def check(response: httpx.Response, case: Case) -> str:
    """The rule every answer obeys; returns the answer's kind (``"ok"`` or the status)."""
    status = response.status_code
    assert status < 500, f"{case}: {status} {response.text[:500]}"
    assert status < 300 or status in ALLOWED_ERRORS, f"{case}: {status} {response.text[:500]}"
    if status >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(
                f"{case}: {status} without OpenAI's error shape: {response.text[:500]}"
            ) from None
        assert set(error) == {"message", "type", "param", "code"}, f"{case}: {response.text[:500]}"
        assert isinstance(error["message"], str) and error["message"], case
        return str(status)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line for line in response.text.splitlines() if line]
        assert lines and lines[-1] == "data: [DONE]", f"{case}: {lines[-3:]}"
        for line in lines[:-1]:
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event, f"{case}: {event}"
    else:
        assert "choices" in response.json() or "data" in response.json(), (
            f"{case}: {response.text[:500]}"
        )
    return "ok"


def send(client: httpx.Client, base_url: str, case: Case) -> httpx.Response:
    return client.request(
        case.method,
        base_url + case.path,
        content=case.body,
        headers={"content-type": "application/json"},
    )


def tiny_model(tokenizer):
    """The random 2-layer model of the server tests (what is fuzzed is the request handling)."""
    import torch

    import llamakin

    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0, 1.0)
    return model
