"""Tool calls in the model's own output format: parsing them (whole or streamed) and forcing them.

A model that was trained to call tools writes its calls as text in a format its chat template
teaches it. Each format is one :class:`ToolCallFormat` in :data:`FORMATS`, chosen by a marker its
chat template contains (:func:`format_for_template`). A format knows how to

* split a finished answer into content and :class:`ToolCall` objects (:meth:`ToolCallFormat.parse`),
* do the same while the answer streams (:meth:`ToolCallFormat.splitter`: text that cannot be part
  of a call is passed on at once; a call is handed out whole once its closing tag arrives),
* give the grammar of "one or more calls of these tools" for constrained decoding, which enforces
  ``tool_choice: "required"`` or a named function (:meth:`ToolCallFormat.grammar`; ``None`` when
  the format has no grammar yet, and the server then refuses those choices with a 400).

Formats (add one by subclassing :class:`ToolCallFormat` and listing it in :data:`FORMATS`):

* ``hermes``: Hermes 2 Pro, Qwen 2.5 and Qwen 3 —
  ``<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>``, one block per call
  (https://github.com/NousResearch/Hermes-Function-Calling; Qwen's template in
  ``tokenizer_config.json``).
* ``mistral``: Mistral v0.3 — ``[TOOL_CALLS] [{"name": NAME, "arguments": {...}}, ...]``, the
  rest of the answer (https://github.com/mistralai/mistral-common); parsed only, not forced.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from ..constrained import lark_json

# a literal text -> a Lark item for it (llamakin.constrained.lark_literal)
Quote = Callable[[str], str]


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON text, as OpenAI's API carries it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's shape; with ``index``, the shape of a streamed ``delta.tool_calls`` item."""
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def _call_from(obj: Any) -> ToolCall | None:
    """A call from a decoded ``{"name": ..., "arguments": {...}}`` object (``parameters`` is
    accepted for ``arguments``, as some models write it), or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # already a JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallFormat:
    """A tool-call format delimited by ``start`` (and ``end``, or the end of the answer)."""

    name = ""
    markers: tuple[str, ...] = ()  # text in a chat template that says the model writes this format
    start = ""
    end: str | None = None  # None: a call block runs to the end of the answer

    def calls_in(self, block: str) -> list[ToolCall] | None:
        """The calls in the text of one block (between the tags), or None if it is not calls."""
        raise NotImplementedError

    def grammar(
        self, tools: list[dict[str, Any]], quote: Quote, parallel: bool = True
    ) -> str | None:
        """A Lark grammar (llguidance's dialect) of an answer that is only calls of ``tools``
        (OpenAI tool objects; one call unless ``parallel``), or None if this format cannot be forced.
        ``quote`` spells a tag for the tokenizer (a special token, or text)."""
        return None

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content (the text outside call blocks) and the calls of a whole answer. A block
        that does not parse stays in the content, as the model wrote it."""
        splitter = self.splitter()
        pieces = splitter.feed(text) + splitter.finish()
        content = "".join(p for p in pieces if isinstance(p, str))
        return content, [p for p in pieces if isinstance(p, ToolCall)]

    def splitter(self) -> "Splitter":
        return Splitter(self)


class Splitter:
    """Streams an answer apart into content text and whole tool calls.

    ``feed(text)`` and ``finish()`` return lists of ``str`` (content) and :class:`ToolCall`. Text
    that might be the beginning of the start tag is held back until it is clearly not.
    """

    def __init__(self, fmt: ToolCallFormat):
        self.fmt = fmt
        self.pending = ""  # held back: a possible start tag, or a block not closed yet
        self.inside = False

    def feed(self, text: str) -> list[str | ToolCall]:
        self.pending += text
        out: list[str | ToolCall] = []
        while self.pending:
            if not self.inside:
                at = self.pending.find(self.fmt.start)
                if at < 0:
                    keep = _partial_suffix(self.pending, self.fmt.start)
                    if len(self.pending) > keep:
                        out.append(self.pending[: len(self.pending) - keep])
                        self.pending = self.pending[len(self.pending) - keep :]
                    break
                if at:
                    out.append(self.pending[:at])
                self.pending, self.inside = self.pending[at:], True
            else:
                if self.fmt.end is None:
                    break
                close = self.pending.find(self.fmt.end, len(self.fmt.start))
                if close < 0:
                    break
                close += len(self.fmt.end)
                out.extend(self._block(self.pending[:close]))
                self.pending, self.inside = self.pending[close:], False
        return _merge(out)

    def finish(self) -> list[str | ToolCall]:
        """What is held back at the end: an unclosed block is still parsed (a model may stop
        right after the JSON), and left as content if it is not calls."""
        rest, self.pending = self.pending, ""
        if self.inside:
            self.inside = False
            return self._block(rest)
        return [rest] if rest else []

    def _block(self, block: str) -> list[str | ToolCall]:
        body = block[len(self.fmt.start) :]
        if self.fmt.end is not None and body.endswith(self.fmt.end):
            body = body[: -len(self.fmt.end)]
        calls = self.fmt.calls_in(body.strip())
        return list(calls) if calls else [block]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _merge(pieces: list[str | ToolCall]) -> list[str | ToolCall]:
    out: list[str | ToolCall] = []
    for p in pieces:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        elif not isinstance(p, str) or p:
            out.append(p)
    return out


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


class Hermes(ToolCallFormat):
    name = "hermes"
    markers = ("<tool_call>",)
    start, end = "<tool_call>", "</tool_call>"

    def calls_in(self, block: str) -> list[ToolCall] | None:
        try:
            call = _call_from(json.loads(block))
        except ValueError:
            return None
        return [call] if call else None

    def grammar(
        self, tools: list[dict[str, Any]], quote: Quote, parallel: bool = True
    ) -> str | None:
        # one JSON shape per tool, so each call's arguments follow that tool's own schema
        rules = [f"call_{i}: {lark_json(_call_schema(tool))}" for i, tool in enumerate(tools)]
        alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
        start = r'start: block ("\n" block)*' if parallel else "start: block"
        block = f'block: {quote(self.start)} "\\n" call "\\n" {quote(self.end)}'
        return "\n".join([start, block, f"call: {alternatives}", *rules])


class Mistral(ToolCallFormat):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    start, end = "[TOOL_CALLS]", None

    def calls_in(self, block: str) -> list[ToolCall] | None:
        try:
            value = json.loads(block)
        except ValueError:
            return None
        calls = [_call_from(item) for item in (value if isinstance(value, list) else [value])]
        return calls if calls and all(calls) else None


FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (Hermes(), Mistral())}


def format_for_template(chat_template: str | None) -> ToolCallFormat | None:
    """The tool-call format a chat template teaches (by its markers), or None."""
    for fmt in FORMATS.values():
        if chat_template and any(marker in chat_template for marker in fmt.markers):
            return fmt
    return None


__all__ = [
    "FORMATS",
    "Hermes",
    "Mistral",
    "Splitter",
    "ToolCall",
    "ToolCallFormat",
    "format_for_template",
]
