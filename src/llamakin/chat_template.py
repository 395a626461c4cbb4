"""Chat templates, rendered in a sandbox with transformers' semantics.

Templates come from model files (``tokenizer_config.json``, ``chat_template.jinja``, GGUF
metadata), so they are untrusted code: they run in Jinja's ``ImmutableSandboxedEnvironment``
(no attribute access to internals, no mutation of passed objects). The environment matches
transformers' ``apply_chat_template``: ``trim_blocks``/``lstrip_blocks``, loop controls, the
``raise_exception`` and ``strftime_now`` globals and a ``tojson`` filter that keeps non-ASCII text.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import LlamakinError


class TemplateError(LlamakinError):
    """A chat template that is broken, or that refuses the conversation it was given."""


def _raise_exception(message: str):
    raise TemplateError(f"the chat template refused this conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template has a syntax error on line {e.lineno}: {e.message}.") from None


def validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise TemplateError(f"message {i} must be an object with a string 'role' and a 'content'.")


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **kwargs: Any) -> str:
    """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with a Jinja chat template."""
    import jinja2
    from jinja2.sandbox import SecurityError

    validate_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **kwargs)
    except TemplateError:
        raise
    except SecurityError as e:
        raise TemplateError(f"the chat template tried something the sandbox forbids ({e}).") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template failed to render ({e}).") from None
