"""Text generation for the Python API: :func:`generate`, :func:`generate_batch` and
:class:`GenerationRun`, over the one generation core (:mod:`llamakin.generation`) that the chat
and the server use too. A single prompt is a batch of one row; several prompts are prefilled as
one left-padded batch and decoded together, each row with its own sampler (seeded with the
request's seed for the first row and :func:`~llamakin.generation.derive_seed` for the others).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Iterator, Sequence

import torch

from .errors import LlamakinError
from .generation import PrefixCache, Row, RowBatch, RowSampler, SamplingParams, TextStream
from .generation.rows import RowResult
from .generation.sampling import (  # noqa: F401 - the public names of the sampling processors
    LogitsProcessor,
    apply_frequency_presence,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    next_tokens,
)
from .generation.stats import GenerationStats
from .speed.decode_trace import cache_length_for
from .token_ids import check_token_ids
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


# -- the generation loop ---------------------------------------------------------------------------
def encode_prompt(
    tokenizer: Tokenizer, prompt: str | list[int] | list[dict[str, Any]]
) -> list[int]:
    """Token ids for a plain prompt, pre-tokenized ids, or a chat (list of messages)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        # the rendered template already carries the special tokens the model expects
        return tokenizer.encode(tokenizer.apply_chat_template(prompt), add_special_tokens=False)
    if all(isinstance(i, int) for i in prompt):
        return list(prompt)
    raise LlamakinError(
        "a prompt must be a string, a list of token ids or a list of chat messages."
    )


class GenerationRun:
    """An iterator over ``(row, text piece)`` for a batch of prompts; ``results`` and ``stats``
    are complete once it is exhausted.

    ``prefix_cache``: keys/values of earlier sequences to reuse (``llamakin chat`` keeps one across
    turns); the rows' own sequences are stored in it when they finish. ``processors``: per-row
    logits processors (one list per prompt), see :data:`~llamakin.generation.sampling.LogitsProcessor`.
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        prompts: list[list[int]],
        params: SamplingParams,
        prefix_cache: PrefixCache | None = None,
        processors: Sequence[Sequence[LogitsProcessor]] | None = None,
    ):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LlamakinError(
                "every prompt needs at least one token; an empty prompt gives the model nothing to continue."
            )
        for n, prompt in enumerate(prompts):
            check_token_ids(
                prompt,
                model.config.vocab_size,
                "the prompt" if len(prompts) == 1 else f"prompt {n}",
            )
        context = model.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest + params.max_new_tokens > context:
            if not model.config.rope_extends_context:
                raise LlamakinError(
                    f"the prompt has {longest} tokens and max_new_tokens is {params.max_new_tokens}, together more "
                    f"than the model's context of {context}; shorten the prompt or lower max_new_tokens."
                )
            log.warning(
                f"llamakin: note: generating up to {longest + params.max_new_tokens} tokens, past the model's trained "
                f"context of {context}, which its {model.config.rope_scaling.type} RoPE scaling extends.",
            )
        self.model, self.tokenizer, self.prompts, self.params = model, tokenizer, prompts, params
        self.prefix_cache = prefix_cache
        self.processors = processors
        self.results = [RowResult() for _ in prompts]
        self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), rows=len(prompts))
        self.reused_tokens = 0  # prompt tokens whose keys/values came from the prefix cache
        self._iterator = self._run()

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self._iterator

    def __next__(self) -> tuple[int, str]:
        return next(self._iterator)

    def _rows(self, pending: collections.deque) -> list[Row]:
        model, params = self.model, self.params
        rows = []
        for index, prompt in enumerate(self.prompts):
            processors = self.processors[index] if self.processors is not None else ()
            sampler = RowSampler(
                params, model.config.vocab_size, model.device, prompt, index, processors
            )
            rows.append(
                Row(
                    list(prompt),
                    params,
                    sampler,
                    TextStream(self.tokenizer, params.stop),
                    result=self.results[index],
                    owner=index,
                    on_text=lambda piece, index=index: pending.append((index, piece)),
                )
            )
        return rows

    @torch.inference_mode()
    def _run(self) -> Iterator[tuple[int, str]]:
        model, params = self.model, self.params
        needed = max(len(p) for p in self.prompts) + params.max_new_tokens
        eos = () if params.ignore_eos else self.tokenizer.eos_token_ids
        batch = RowBatch(
            model,
            eos,
            len(self.prompts),
            cache_length_for(needed, max(model.config.max_position_embeddings, needed)),
            self.prefix_cache,
        )
        pending: collections.deque = collections.deque()
        rows = self._rows(pending)
        start = time.perf_counter()
        batch.admit(rows)
        self.stats.prefill_seconds = time.perf_counter() - start
        self.reused_tokens = sum(r.reused for r in rows)
        start = time.perf_counter()
        while True:
            for row in batch.retire():
                if row.error is not None:
                    raise row.error
            yield from _drain(pending)
            if not batch.rows:
                break
            batch.step()
        self.stats.decode_seconds = time.perf_counter() - start
        self.stats.generated_tokens = sum(len(r.token_ids) for r in self.results)


def _drain(pending: collections.deque) -> Iterator[tuple[int, str]]:
    while pending:
        yield pending.popleft()


def _params(
    max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos
):
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple([stop] if isinstance(stop, str) else (stop or ())),
        ignore_eos=ignore_eos,
    )


class TextIterator:
    """The pieces of one streamed generation; ``stats`` and ``finish_reason`` after exhaustion."""

    def __init__(self, run: GenerationRun):
        self.run = run

    def __iter__(self) -> Iterator[str]:
        for _, piece in self.run:
            yield piece

    @property
    def stats(self) -> GenerationStats:
        return self.run.stats

    @property
    def finish_reason(self) -> str | None:
        return self.run.results[0].finish_reason


def generate(
    model,
    tokenizer: Tokenizer,
    prompt: str | list[int] | list[dict[str, Any]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    ignore_eos: bool = False,
    stream: bool = False,
    logits_processor=None,
):
    """Continue ``prompt`` (a string, token ids, or chat messages rendered with the model's template).

    Returns the generated text, or with ``stream=True`` an iterator of text pieces (a
    :class:`TextIterator`, whose ``stats`` hold token counts and speeds once it is exhausted).
    ``logits_processor``: ``(generated ids, logits [V]) -> logits`` applied before each sampling, e.g.
    ``Grammar.json(tokenizer, schema, model.config.vocab_size).constraint()`` from
    :mod:`llamakin.constrained` for output that is valid JSON for ``schema``. Speculative decoding:
    :func:`llamakin.generate_speculative`.
    """
    params = _params(
        max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos
    )
    processors = [[logits_processor]] if logits_processor is not None else None
    run = GenerationRun(
        model, tokenizer, [encode_prompt(tokenizer, prompt)], params, processors=processors
    )
    if stream:
        return TextIterator(run)
    for _ in run:
        pass
    return run.results[0].text


def generate_batch(
    model,
    tokenizer: Tokenizer,
    prompts: Sequence[str | list[int] | list[dict[str, Any]]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    ignore_eos: bool = False,
) -> list[str]:
    """Generate for several prompts at once in one left-padded batch; one text per prompt."""
    params = _params(
        max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos
    )
    run = GenerationRun(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], params)
    for _ in run:
        pass
    return [r.text for r in run.results]
