"""What shapes a chat answer beyond sampling: ``tools``/``tool_choice`` and ``response_format``.

:func:`plan_chat_output` turns a validated request into a :class:`ChatOutput`, which says

* what the chat template gets besides the messages (``tools``, unless ``tool_choice`` is
  ``"none"``: then the model is not told about tools and its output is not parsed for calls);
* which grammar, if any, constrains decoding (:mod:`llamakin.constrained`):
  ``response_format`` ``json_object`` (any JSON object) or ``json_schema`` (that schema), and
  ``tool_choice`` ``"required"`` or ``{"type": "function", "function": {"name": ...}}`` (only
  calls of those tools, in the model's tool-call format, each call's ``arguments`` valid for the
  tool's ``parameters`` schema);
* how the answer's text becomes OpenAI's message (``content`` and ``tool_calls``, parsed in the
  model's format by :mod:`.tools`), whole or as streamed deltas, and the finish reason
  (``tool_calls`` when the answer ended with calls).

Everything that cannot be honoured is a 400 naming the field: tools for a model whose chat template
does not render them, a forced tool choice in a format with no grammar, a schema keyword the
grammar compiler does not implement, or ``response_format`` together with tools that may be called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..constrained import Grammar, lark_grammar, lark_literal
from ..errors import LlamakinError
from .schema import APIError, ChatRequest
from .tools import ToolCall, ToolCallFormat, format_for_template


@dataclass
class ChatOutput:
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    grammar: Grammar | None = None
    fmt: ToolCallFormat | None = None  # parse the answer for tool calls in this format

    def logits_processor(self):
        """A fresh per-row processor for the engine's hook (None when decoding is free)."""
        return None if self.grammar is None else self.grammar.constraint()

    def message(self, text: str) -> dict[str, Any]:
        """The ``choices[].message`` of a whole answer."""
        if self.fmt is None:
            return {"role": "assistant", "content": text}
        content, calls = self.fmt.parse(text)
        message = {
            "role": "assistant",
            "content": content if content.strip() or not calls else None,
        }
        if calls:
            message["tool_calls"] = [c.openai() for c in calls]
        return message

    @staticmethod
    def finish_reason(reason: str | None, called: bool) -> str | None:
        """OpenAI's ``tool_calls`` for an answer that ended (not cut off) with calls."""
        return "tool_calls" if called and reason == "stop" else reason

    def stream(self) -> "DeltaStream":
        return DeltaStream(self.fmt)


class DeltaStream:
    """Text pieces in, ``choices[].delta`` objects out: content as it comes, each tool call whole
    (its ``id``, ``name`` and complete ``arguments`` in one delta, with its ``index``)."""

    def __init__(self, fmt: ToolCallFormat | None):
        self.splitter = fmt.splitter() if fmt else None
        self.calls = 0

    def _deltas(self, pieces: list[str | ToolCall]) -> list[dict[str, Any]]:
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append({"content": piece})
            else:
                out.append({"tool_calls": [piece.openai(index=self.calls)]})
                self.calls += 1
        return out

    def feed(self, text: str) -> list[dict[str, Any]]:
        return (
            [{"content": text}] if self.splitter is None else self._deltas(self.splitter.feed(text))
        )

    def finish(self) -> list[dict[str, Any]]:
        return [] if self.splitter is None else self._deltas(self.splitter.finish())


def _grammar(tokenizer, vocab_size: int, what: str, param: str, build) -> Grammar:
    try:
        return build()
    except LlamakinError as e:
        raise APIError(
            400,
            f"{what}: {e}" if not str(e).startswith(what) else str(e),
            param=param,
            code="invalid_value",
        ) from None
    except Exception as e:  # noqa: BLE001 - the compiler refused something it was given: the request's fault
        raise APIError(
            400,
            f"{what} could not be compiled for constrained decoding ({type(e).__name__}: {e}).",
            param=param,
            code="invalid_value",
        ) from None


def plan_chat_output(body: ChatRequest, tokenizer, vocab_size: int) -> ChatOutput:
    """The :class:`ChatOutput` of ``body``, or :class:`APIError` (400). Compiling a grammar can take
    a second the first time for a tokenizer: call it off the event loop."""
    out = ChatOutput()
    all_tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    tools = all_tools  # the ones a forced choice may call
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    forced = choice == "required" or not isinstance(choice, str)
    if forced and not tools:
        raise APIError(
            400,
            "tool_choice asks for a tool call but the request has no tools; send tools or drop "
            "tool_choice.",
            param="tool_choice",
        )
    if not isinstance(choice, str):
        name = choice.function.name
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise APIError(
                400,
                f"tool_choice names the function '{name}', which is not among the tools.",
                param="tool_choice",
            )
    fmt = None
    if tools and choice != "none":
        template = tokenizer.chat_template or ""
        if "tools" not in template:
            raise APIError(
                400,
                "this model's chat template does not render tools, so the model cannot be told about "
                "them; send the request without tools.",
                param="tools",
                code="unsupported_parameter",
            )
        fmt = format_for_template(template)
        if fmt is None:
            raise APIError(
                400,
                "this model's chat template renders tools, but in a tool-call format this server "
                "cannot parse; send the request without tools.",
                param="tools",
                code="unsupported_parameter",
            )
        out.template_kwargs["tools"] = (
            all_tools  # the model is told of all of them, even under a named choice
        )
        out.fmt = fmt
    response_format = body.response_format
    wants_json = response_format is not None and response_format.type != "text"
    if wants_json and fmt is not None:
        raise APIError(
            400,
            "response_format cannot be enforced while the model may call tools; send tool_choice "
            "'none' or drop response_format.",
            param="response_format",
            code="unsupported_parameter",
        )
    if forced:
        grammar = fmt.grammar(
            tools,
            lambda text: lark_literal(tokenizer, text),
            parallel=body.parallel_tool_calls is not False,
        )
        if grammar is None:
            raise APIError(
                400,
                f"tool_choice {choice if isinstance(choice, str) else 'naming a function'} cannot be "
                f"enforced for the '{fmt.name}' tool-call format; use 'auto'.",
                param="tool_choice",
                code="unsupported_parameter",
            )
        out.grammar = _grammar(
            tokenizer,
            vocab_size,
            "the tools' parameters",
            "tools",
            lambda: Grammar(tokenizer, lark_grammar(grammar), vocab_size, "the tools' parameters"),
        )
    elif wants_json:
        schema = None
        if response_format.type == "json_schema":
            schema = response_format.json_schema.schema_  # None (absent): any JSON object
        out.grammar = _grammar(
            tokenizer,
            vocab_size,
            "response_format's JSON schema",
            "response_format",
            lambda: Grammar.json(tokenizer, schema, vocab_size, "response_format's JSON schema"),
        )
    if out.grammar is not None and body.ignore_eos:
        raise APIError(
            400,
            "ignore_eos cannot be combined with constrained output (response_format or a forced "
            "tool_choice): the grammar ends the answer.",
            param="ignore_eos",
        )
    return out


__all__ = ["ChatOutput", "DeltaStream", "plan_chat_output"]
