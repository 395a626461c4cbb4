"""Constrained decoding: every sampled token keeps the text a valid prefix of a grammar.

A grammar (any JSON value of a JSON schema, "any JSON object", or a Lark grammar such as the
tool-call formats of :mod:`llamakin.serve.tools`) is compiled once per request by `llguidance
<https://github.com/guidance-ai/llguidance>`_ (a Rust library with Python bindings, no torch
dependency; the engine behind structured outputs in vLLM, SGLang and llama.cpp). Each generated
row then gets its own :class:`TokenConstraint`, a *logits processor*: called with the row's
generated token ids and its logits row just before sampling, it returns the logits with every
token that could not continue the grammar set to ``-inf``. End-of-sequence tokens are allowed
only once the text is complete (``is_accepting``), so a constrained answer either ends as a whole
document or runs out of ``max_tokens`` (finish reason ``length``).

JSON is written in Python's ``json.dumps`` style (``", "`` and ``": "`` separators, no other
whitespace): the shape models see most, and no unbounded whitespace a sampler could loop in.
Schema keywords llguidance does not implement (``not``, ``if``/``then``, ...) are refused with
one sentence naming them (https://github.com/guidance-ai/llguidance/blob/main/docs/json_schema.md),
never ignored.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import LlamakinError
from .tokenizer import Tokenizer

# (generated token ids of the row, logits [V] of the row) -> logits [V] to sample from
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}  # OpenAI's json_object mode: one JSON object


class ConstraintError(LlamakinError):
    """A schema or grammar that cannot be enforced (invalid, or using an unimplemented feature)."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise LlamakinError(
            "constrained decoding needs the llguidance package; install llamakin[serve] "
            "(pip install llguidance)."
        ) from None
    return llguidance


@functools.lru_cache(maxsize=4)
def llg_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    """llguidance's view of ``tokenizer`` (each token's bytes, the EOS ids), for logits of
    ``vocab_size`` entries (ids past the tokenizer's vocabulary are never allowed). Building it
    walks the whole vocabulary (about a second for 50k tokens), so it is cached."""
    llg = _llguidance()
    backend = tokenizer.backend
    if not hasattr(backend, "to_str"):
        raise LlamakinError(
            f"constrained decoding needs a Hugging Face 'tokenizers' tokenizer; the one from "
            f"{tokenizer.source or 'this model'} is {type(backend).__name__}."
        )
    return llg.LLTokenizer(
        backend.to_str(), n_vocab=vocab_size, eos_token=list(tokenizer.eos_token_ids) or None
    )


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """The llguidance grammar of one JSON value valid for ``schema`` (``None``: any JSON object)."""
    if schema is not None and not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}.")
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(
            ANY_JSON_OBJECT if schema is None else schema, defaults=JSON_STYLE
        )
    except ValueError as e:
        raise ConstraintError(f"the JSON schema is not usable ({e}).") from None


def lark_grammar(text: str) -> str:
    """The llguidance grammar of a Lark grammar text (``%json {schema}`` embeds a JSON schema;
    https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md)."""
    return _llguidance().LLMatcher.grammar_from_lark(text)


def lark_literal(tokenizer: Tokenizer, text: str) -> str:
    """``text`` as a Lark item: the token itself (``<[id]>``) when the vocabulary holds it as one
    token (llguidance treats added tokens such as Qwen's ``<tool_call>`` as special, so they never
    match a quoted string), else the quoted string."""
    token = tokenizer.token_to_id(text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


def lark_json(schema: dict[str, Any]) -> str:
    """``schema`` as a Lark ``%json`` rule body, in :data:`JSON_STYLE`."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})


class Grammar:
    """A validated grammar for one tokenizer and vocabulary size; :meth:`constraint` makes one
    fresh logits processor per generated row."""

    def __init__(
        self, tokenizer: Tokenizer, grammar: str, vocab_size: int, what: str = "the grammar"
    ):
        llg = _llguidance()
        self.tokenizer = llg_tokenizer(tokenizer, vocab_size)
        self.grammar, self.vocab_size = grammar, vocab_size
        problem = llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            problem = problem.strip().splitlines()[0]
            hint = ""
            if problem.startswith("Unimplemented keys"):
                hint = "; these JSON schema keywords are not supported by constrained decoding, remove them"
            raise ConstraintError(f"{what} cannot be enforced: {problem}{hint}.")

    @classmethod
    def json(
        cls,
        tokenizer: Tokenizer,
        schema: dict[str, Any] | None,
        vocab_size: int,
        what: str = "the JSON schema",
    ) -> "Grammar":
        return cls(tokenizer, json_schema_grammar(schema), vocab_size, what)

    def constraint(self) -> "TokenConstraint":
        return TokenConstraint(self)


class TokenConstraint:
    """A per-row logits processor keeping the row's text a prefix of its grammar.

    Stateful: it follows one row's generated ids (it consumes the ones it has not seen on each
    call), so every row needs its own. A token the grammar refuses (possible only when something
    other than this processor chose it) raises :class:`LlamakinError` for that row alone.
    """

    def __init__(self, grammar: Grammar):
        self.matcher = _llguidance().LLMatcher(grammar.tokenizer, grammar.grammar, log_level=0)
        self.vocab_size = grammar.vocab_size
        self.consumed = 0
        self.bits = torch.empty((self.vocab_size + 31) // 32, dtype=torch.int32)

    def advance(self, token_ids: Sequence[int]) -> None:
        """Feed the ids of ``token_ids`` not fed yet."""
        new = list(token_ids[self.consumed :])
        if new and not self.matcher.consume_tokens(new):
            raise LlamakinError(
                f"a generated token broke the output's grammar ({self.matcher.get_error()})."
            )
        self.consumed = len(token_ids)

    def _allowed(self, token_ids: Sequence[int]) -> np.ndarray:
        self.advance(token_ids)
        self.matcher.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.bits.numel() * 4)
        if self.matcher.is_error():
            raise LlamakinError(
                f"the output's grammar has no continuation ({self.matcher.get_error()})."
            )
        return np.unpackbits(self.bits.numpy().view(np.uint8), bitorder="little")[
            : self.vocab_size
        ].view(np.bool_)

    def allowed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """A bool ``[V]`` mask of the tokens that may follow ``token_ids``."""
        return torch.from_numpy(self._allowed(token_ids))

    def is_complete(self, token_ids: Sequence[int]) -> bool:
        """Whether ``token_ids`` form a whole document of the grammar."""
        self.advance(token_ids)
        return self.matcher.is_accepting()

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        allowed = self._allowed(token_ids)
        if logits.shape[-1] != self.vocab_size:
            raise LlamakinError(
                f"the logits have {logits.shape[-1]} entries but the grammar was built for "
                f"{self.vocab_size}."
            )
        if logits.device.type != "cpu":
            return torch.where(torch.from_numpy(allowed).to(logits.device), logits, float("-inf"))
        # on the CPU in numpy: one row is too small for torch's threads, whose start-up cost
        # dominated (measured 0.2 ms in numpy against 8-44 ms for torch.where / masked_fill on a
        # loaded 2-core machine, bench_constrained.py)
        masked = np.where(allowed, logits.detach().float().numpy(), np.float32(-np.inf))
        return torch.from_numpy(masked).to(logits.dtype)


__all__ = [
    "ANY_JSON_OBJECT",
    "ConstraintError",
    "Grammar",
    "LogitsProcessor",
    "TokenConstraint",
    "json_schema_grammar",
    "lark_grammar",
    "lark_json",
    "lark_literal",
    "llg_tokenizer",
]
