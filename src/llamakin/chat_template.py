"""Chat templates, rendered in a sandbox with transformers' semantics, within time and size bounds.

Templates come from model files (``tokenizer_config.json``, ``chat_template.jinja``, GGUF
metadata), so they are untrusted code: they run in Jinja's ``ImmutableSandboxedEnvironment``
(no attribute access to internals, no mutation of passed objects). The environment matches
transformers' ``apply_chat_template``: ``trim_blocks``/``lstrip_blocks``, loop controls, the
``raise_exception`` and ``strftime_now`` globals and a ``tojson`` filter that keeps non-ASCII text.

The sandbox stops escapes, not exhaustion, so rendering is bounded as well (the limits below):
every loop iteration, call and filter checks a deadline; every string or list a template builds
with ``+``, ``*``, ``~``, ``%``, a call or a filter is refused past :data:`MAX_OUTPUT_CHARS`, and
so is the rendered text; integer arguments that would size a string (``center``, ``indent``,
``ljust``, format widths, ``**``) are capped. ``range`` is Jinja's own (at most 100,000 items).
Every failure is one :class:`TemplateError` sentence naming the template.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import LlamakinError

MAX_TEMPLATE_CHARS = 1 << 20  # template source
MAX_OUTPUT_CHARS = 8 << 20  # rendered text, and any one string or list built while rendering
MAX_SECONDS = 2.0  # wall-clock time of one rendering
MAX_SIZE_ARGUMENT = 100_000  # an integer argument (width, count) to a call, a filter, % or **
_WIDE_FORMAT = re.compile(r"\d{6,}")  # a format width of a million or more inside a format string


class TemplateError(LlamakinError):
    """A chat template that is broken, or that refuses the conversation it was given."""


def _raise_exception(message: str):
    raise TemplateError(f"the chat template refused this conversation: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators=None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Limits(threading.local):
    deadline = float("inf")


_limits = _Limits()


class _Exhausted(Exception):
    """Raised inside a rendering that passed a bound; :func:`render` names the template."""


def _check_deadline() -> None:
    if time.monotonic() > _limits.deadline:
        raise _Exhausted(f"it ran longer than {MAX_SECONDS:g} s")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, bytes)) and len(value) > MAX_OUTPUT_CHARS:
        raise _Exhausted(
            f"it built a {type(value).__name__} of more than {MAX_OUTPUT_CHARS:,} items"
        )
    return value


def _check_arguments(args: Any, kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and abs(value) > MAX_SIZE_ARGUMENT
        ):
            raise _Exhausted(
                f"it passed the number {value} to a function (at most {MAX_SIZE_ARGUMENT:,} is allowed)"
            )


def _bounded_iter(iterable: Any):
    """What every ``{% for %}`` loop iterates over: the same items, with the deadline checked."""
    for item in iterable:
        _check_deadline()
        yield item


def _concat(value: Any) -> Any:
    return _check_size(value)


_GUARD_ITER, _GUARD_CONCAT = "__llamakin_bounded_iter", "__llamakin_sized"


def _guarded_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context/pass_environment markers
    def wrapper(*args, **kwargs):
        _check_deadline()
        _check_arguments(args, kwargs)
        if f.__name__ == "do_format" and any(
            isinstance(a, str) and _WIDE_FORMAT.search(a) for a in args
        ):
            raise _Exhausted("it formatted with a width of a million or more")
        return _check_size(f(*args, **kwargs))

    return wrapper


def _environment():
    from jinja2 import nodes
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    def guard(name: str, node):
        return nodes.Call(nodes.Name(name, "load"), [node], [], None, None, lineno=node.lineno)

    class Guards(NodeTransformer):
        """Every loop's iterable and every ``~`` concatenation go through a check."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = guard(_GUARD_ITER, node.iter)
            return node

        def visit_Concat(self, node):
            return guard(_GUARD_CONCAT, self.generic_visit(node))

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "%", "**", "//"})

        def _parse(self, source, name, filename):
            return Guards().visit(super()._parse(source, name, filename))

        def call_binop(self, context, operator, left, right):
            _check_deadline()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if (
                        isinstance(seq, (str, list, tuple))
                        and isinstance(n, int)
                        and not isinstance(n, bool)
                    ):
                        size = (
                            sum(len(x) if isinstance(x, (str, list, tuple)) else 1 for x in seq)
                            if not isinstance(seq, str)
                            else len(seq)
                        )
                        if size * n > MAX_OUTPUT_CHARS:
                            raise _Exhausted(
                                f"it multiplied a {type(seq).__name__} of {size:,} items by {n:,}"
                            )
            elif operator == "**":
                if (
                    isinstance(right, (int, float))
                    and isinstance(left, (int, float))
                    and abs(left) > 1
                ):
                    bits = max(abs(int(left)), 2).bit_length()
                    if abs(right) * bits > 1 << 20:
                        raise _Exhausted(f"it raised {left!r} to the power {right!r}")
            elif operator == "%" and isinstance(left, str):
                if _WIDE_FORMAT.search(left):
                    raise _Exhausted("it formatted with a width of a million or more")
                _check_arguments(right if isinstance(right, tuple) else (right,), {})
            return _check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own spelling
            _check_deadline()
            _check_arguments(args, kwargs)
            target = getattr(__obj, "__wrapped__", __obj)
            owner = getattr(target, "__self__", None)
            if (
                isinstance(owner, str)
                and getattr(target, "__name__", "") in ("format", "format_map")
                and _WIDE_FORMAT.search(owner)
            ):
                raise _Exhausted("it formatted with a width of a million or more")
            return _check_size(super().call(__context, __obj, *args, **kwargs))

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guarded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals[_GUARD_ITER] = _bounded_iter
    env.globals[_GUARD_CONCAT] = _concat
    return env


@lru_cache(maxsize=1)
def _shared_environment():
    return _environment()


@lru_cache(maxsize=16)
def _compile(template: str, name: str):
    import jinja2

    try:
        return _shared_environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{name} has a syntax error on line {e.lineno}: {e.message}.") from None
    except RecursionError:
        raise TemplateError(f"{name} nests too deeply to compile.") from None


def validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise TemplateError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} objects."
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise TemplateError(
                f"message {i} must be an object with a string 'role' and a 'content'."
            )


def render(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    name: str = "the chat template",
    **kwargs: Any,
) -> str:
    """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with a Jinja chat template.

    ``name`` says whose template it is in error messages (e.g. "the chat template of DIR")."""
    import jinja2
    from jinja2.sandbox import SecurityError

    if not isinstance(template, str):
        raise TemplateError(
            f"{name} is a {type(template).__name__}, not Jinja text; fix chat_template in the "
            "tokenizer config."
        )
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(
            f"{name} has {len(template):,} characters, more than the {MAX_TEMPLATE_CHARS:,} "
            "llamakin accepts."
        )
    validate_messages(messages)
    compiled = _compile(template, name)
    outer = _limits.deadline
    _limits.deadline = min(outer, time.monotonic() + MAX_SECONDS)
    pieces, size = [], 0
    try:
        for piece in compiled.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **kwargs,
        ):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise _Exhausted(f"its output passed {MAX_OUTPUT_CHARS:,} characters")
            pieces.append(piece)
    except TemplateError:
        raise
    except _Exhausted as e:
        raise TemplateError(
            f"{name} was stopped: {e}; llamakin bounds templates to {MAX_SECONDS:g} s and "
            f"{MAX_OUTPUT_CHARS:,} characters."
        ) from None
    except SecurityError as e:
        raise TemplateError(f"{name} tried something the sandbox forbids ({e}).") from None
    except RecursionError:
        raise TemplateError(
            f"{name} recursed too deeply (a macro calling itself without end)."
        ) from None
    except MemoryError:
        raise TemplateError(f"{name} ran out of memory while rendering.") from None
    except OverflowError as e:
        raise TemplateError(f"{name} asked for a number too large ({e}).") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"{name} failed to render ({e}).") from None
    except Exception as e:  # noqa: BLE001 - anything else a template can raise (1/0, bad types, ...)
        detail = str(e).splitlines()[0] if str(e) else ""
        raise TemplateError(f"{name} failed to render ({type(e).__name__}: {detail}).") from None
    finally:
        _limits.deadline = outer
    return "".join(pieces)
