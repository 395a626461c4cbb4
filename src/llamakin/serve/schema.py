"""What a request may contain, and every check on it, in one place.

:func:`parse_body` turns the raw bytes of a request into a validated :class:`ChatRequest` or
:class:`CompletionRequest`, or raises :class:`APIError` with OpenAI's error shape, a sentence that
names the problem, and ``param`` naming the field:

* the body: valid UTF-8 (RFC 8259 section 8.1), strict JSON (no ``NaN``/``Infinity``, no integer with
  more digits than Python converts), nested at most :data:`MAX_JSON_DEPTH` levels, an object;
* the fields: their types (strict: ``"1"`` is not a number), their ranges, and the ranges the
  sampler can compute with (:data:`MIN_TEMPERATURE`, the ``seed`` range of ``torch.Generator``,
  bounded stop strings);
* fields that are not known: a field in :data:`IGNORED_FIELDS` does not change the answer and is
  accepted; any other unknown field gets a 400 naming it, so a client never silently gets an
  answer computed without the parameter it asked for. vLLM's extra sampling parameters
  ``top_k``, ``min_p``, ``repetition_penalty`` and ``ignore_eos`` are applied
  (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html#extra-parameters);
* the shapes of ``tools``, ``tool_choice``, ``response_format`` and of tool turns in ``messages``
  (what they mean, and the checks that need the model's template or a grammar: :mod:`.structured`).

:func:`sampling_params` then checks what needs the server's state (the context) and builds the
generation core's :class:`~llamakin.generation.SamplingParams` (the one object the CLI and the
Python API build too).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import LlamakinError
from ..generation import SamplingParams
from .logprobs import MAX_TOP_LOGPROBS

# strict still takes a JSON integer (1 -> 1.0), never a string
StrictFloat = Annotated[float, Strict()]
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
StrictStr = Annotated[str, Strict()]

MAX_JSON_DEPTH = 32  # the deepest legitimate body (chat content parts) is 5 levels
MIN_TEMPERATURE = 1e-5  # below this (and above 0) logits / temperature overflows float32
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # logits / 0.01 stays far inside float32
MAX_STOP_CHARS = 1000  # per stop string: held-back text is checked against each on every token
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_N = 128  # OpenAI's limit for n

# Fields a client may send that do not change the generated text; anything else unknown is a 400.
IGNORED_FIELDS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
    }
)


class APIError(Exception):
    """An answer with OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = (
            status,
            message,
            kind,
            param,
            code,
            headers,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self):
        """This error as the HTTP answer (a ``JSONResponse``, also a plain ASGI app)."""
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- request bodies --------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr  # a JSON text, as OpenAI's API carries it


class ToolCallIn(_Strict):
    """A tool call of an earlier assistant turn, sent back in ``messages``."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = (
        None  # OpenAI's optional participant name; it does not change the prompt
    )
    tool_call_id: StrictStr | None = None  # role "tool": the call this message answers
    tool_calls: list[ToolCallIn] | None = None  # role "assistant": the calls it made

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError(
                "a message with role 'tool' needs 'tool_call_id', the id of the call it answers"
            )
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only a message with role 'tool' carries 'tool_call_id'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only a message with role 'assistant' carries 'tool_calls'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it (transformers' convention): a tool call's
        ``arguments`` decoded to an object when they are JSON, as templates ``tojson`` them."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    arguments = call.function.arguments
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            out["tool_calls"] = calls
        return out


# -- tools and response_format (what they mean: structured.py) --------------------------------------
class FunctionDef(_Strict):
    # OpenAI's rule for names
    name: Annotated[str, Strict(), Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: StrictBool | None = None  # arguments are always enforced when a call is forced


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: StrictStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Annotated[str, Strict(), Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None  # the schema is always enforced


class TextFormat(_Strict):
    type: Literal["text"]


class JSONObjectFormat(_Strict):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")
]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # collected, then refused unless in IGNORED_FIELDS
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0, le=2)
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    # samples of one prompt (at most --max-batch, checked later)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    frequency_penalty: StrictFloat = Field(0.0, ge=-2, le=2)
    presence_penalty: StrictFloat = Field(0.0, ge=-2, le=2)
    # vLLM's extra sampling parameters
    top_k: StrictInt = Field(0, ge=-1)  # 0 or -1: off
    min_p: StrictFloat = Field(0.0, ge=0, lt=1)
    repetition_penalty: StrictFloat = Field(
        1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    ignore_eos: StrictBool = False
    # known, not implemented: refused unless absent or neutral (see UNSUPPORTED)
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(
                f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}; {value:g} overflows the sampler"
            )
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        for s in [value] if isinstance(value, str) else value or ():
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(
                    f"a stop string may have at most {MAX_STOP_CHARS} characters, this one has {len(s)}"
                )
        return value

    @model_validator(mode="after")
    def _unknown_fields(self):
        for name in self.model_extra or {}:
            if name not in IGNORED_FIELDS:
                raise APIError(
                    400,
                    f"unknown parameter '{name}': this server does not implement it, and ignoring it "
                    "could change the answer; remove it from the request.",
                    param=name,
                    code="unsupported_parameter",
                )
        return self


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = (
        None  # false: a forced tool choice makes exactly one call
    )
    response_format: ResponseFormat | None = None
    functions: Any = None
    function_call: Any = None

    def prompt_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: (
        StrictStr
        | Annotated[list[StrictInt], Field(min_length=1)]
        | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
        | Annotated[
            list[Annotated[list[StrictInt], Field(min_length=1)]],
            Field(min_length=1, max_length=64),
        ]
    )
    # OpenAI's default for completions; 0 only with echo
    max_tokens: StrictInt | None = Field(16, ge=0)
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # top-N per token
    suffix: Any = None
    best_of: Any = None

    def prompt_max_tokens(self) -> int | None:
        return self.max_tokens


# Known parameters this server does not implement, with the values that mean "not used".
UNSUPPORTED: dict[type, dict[str, tuple]] = {
    ChatRequest: {
        "functions": (None, []),
        "function_call": (None, "none"),
        "logit_bias": (None, {}),
    },
    CompletionRequest: {
        "logit_bias": (None, {}),
        "suffix": (None, ""),
        "best_of": (None, 1),
        "top_logprobs": (None,),
    },
}


# -- parsing ---------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _find_problem(value: Any, limit: int) -> str | None:
    """What makes a parsed body unusable: nesting deeper than ``limit``, or a string holding a
    lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but no text; tokenizers refuse it)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string in the request body holds a lone UTF-16 surrogate (like \\ud800), which is not text"
        elif isinstance(item, (dict, list)):
            if depth > limit:
                return (
                    f"the request body nests more than {limit} levels deep; no request needs that"
                )
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


def load_json(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``, or a 400 saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(
            400,
            f"the request body is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8.",
            code="invalid_json",
        ) from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        problem = (
            f"the request body nests more than {MAX_JSON_DEPTH} levels deep; no request needs that"
        )
    except ValueError as e:
        raise APIError(
            400,
            f"the request body is not valid JSON ({e}); send a JSON object.",
            code="invalid_json",
        ) from None
    else:
        problem = _find_problem(value, MAX_JSON_DEPTH)
    if problem:
        raise APIError(400, problem + ".", code="invalid_json")
    if not isinstance(value, dict):
        raise APIError(400, "the request body must be a JSON object.", code="invalid_json")
    return value


def _param(loc: tuple) -> str:
    """``('messages', 0, 'content', 'str')`` -> ``'messages.0.content'`` (drops pydantic's union tags)."""
    parts = []
    for part in loc:
        if isinstance(part, str) and (
            "[" in part or part in ("str", "int", "float", "bool", "list", "dict")
        ):
            continue
        parts.append(str(part))
    return ".".join(parts)


def validated(raw: bytes, kind: type[BaseModel], unknown_field: str = "unknown field; remove it"):
    """A request of ``kind`` from the raw body, or :class:`APIError` (400) naming the first bad
    field; ``unknown_field`` is the message for a field the request type does not have."""
    try:
        return kind.model_validate(load_json(raw))
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = _param(first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = unknown_field
        elif first["type"] == "missing":
            message = "this field is required"
        raise APIError(
            400,
            f"invalid value for '{where or 'body'}': {message}.",
            param=where,
            code="invalid_value",
        ) from None


def parse_body(raw: bytes, kind: type[_Sampling]):
    """A validated request of ``kind`` from the raw body, or :class:`APIError` (400)."""
    body = validated(raw, kind, "unknown field, which this server would have to ignore; remove it")
    for name, neutral in UNSUPPORTED[kind].items():
        value = getattr(body, name)
        if not any(value == n and type(value) is type(n) for n in neutral):
            raise APIError(
                400,
                f"'{name}' is not supported by this server; remove it from the request.",
                param=name,
                code="unsupported_parameter",
            )
    return body


def sampling_params(
    body: _Sampling, prompt_len: int, context: int, prompt_param: str
) -> SamplingParams:
    """The engine's parameters for ``body``, after checking that prompt and output fit ``context``."""
    max_tokens = body.prompt_max_tokens()
    room = context - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens, which leaves no room in this server's context of "
            f"{context} tokens; shorten it.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > room:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}, together more than "
            f"this server's context of {context} tokens; lower max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            max_new_tokens=max_tokens or room,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=stop,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            ignore_eos=body.ignore_eos,
        )
    except LlamakinError as e:  # a check the library makes that the schema does not (yet)
        raise APIError(400, str(e), code="invalid_value") from None


__all__ = [
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "IGNORED_FIELDS",
    "MAX_JSON_DEPTH",
    "Message",
    "load_json",
    "parse_body",
    "sampling_params",
]
