"""Speculative decoding for one sequence: a cheap draft proposes ``K`` tokens, the model verifies them
in one forward over the ``K + 1`` positions, and every token it keeps is one the model itself
would have produced.

Drafts (``speculate=``):

* ``"int4"`` - self-speculation: the same model with every projection and the head quantized to
  int4 in groups of 32 (:func:`int4_draft`; the tokenizer is shared by construction). It runs
  ``K`` ordinary decode steps on its own KV cache. It pays when the target is float or int8; a
  target that is already int4 (a Q4_0/Q4_1 GGUF under ``--quantize auto``) gains nothing.
* ``"lookup"`` - prompt lookup decoding (Saxena, 2023; transformers' ``prompt_lookup_num_tokens``):
  the last ``n`` tokens (``n`` = 3, then 2) are looked up in the sequence so far and the ``K``
  tokens that followed their most recent earlier occurrence are the draft. Free to make, it pays
  on text that repeats its context (code edits, summaries, extraction); without a match the step
  is an ordinary decode step.

Verification (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; Chen et al., 2023): with the target's distribution ``p`` (after the same
processors as plain sampling: penalties, temperature, top-k/top-p/min-p) and the draft's ``q``,
draft token ``d`` is kept with probability ``min(1, p(d) / q(d))``; at the first rejection the
token is drawn from ``norm(max(0, p - q))`` and the rest of the draft is dropped; when all ``K`` are
kept, one more token is drawn from ``p`` at position ``K + 1``. Each emitted token is then
distributed exactly as plain sampling's. A lookup draft is deterministic (``q`` one-hot on
``d``): keep with probability ``p(d)``, else draw from ``p`` without ``d``. Greedy decoding keeps a
draft token while it equals the target's argmax, so the output is the target's greedy output, up
to the floating-point difference between a one-token decode step and a ``K + 1``-token forward
(the products are blocked differently; a near-tie in the logits can resolve differently, as in
transformers' assisted generation).

Cache rollback: both models use the static :class:`~llamakin.model.cache.KVCache`. After a
verification the target's cache length is set back to the positions it keeps; slots past the
length are never read (the verifying forward attends to ``[:length + new]``, a decode step masks
every slot past its own) and are overwritten by the next write, so rejected keys and values are
invisible (tested by filling them with garbage). The draft's cache is rolled back the same way,
and it feeds the tokens it has not seen (the target's correction, and the last draft token when
all were kept) at the start of its next proposal.

Batch 1 only, and not for prefix-LM models (ChatGLM-6B), whose 2-D positions the verification
forward does not derive.
"""

from __future__ import annotations

import copy
import itertools
import time
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import LlamakinError
from .generation import SamplingParams, TextStream
from .generation.rows import RowResult
from .generation.sampling import (
    apply_frequency_presence,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)
from .generation.stats import GenerationStats
from .speed.decode_trace import Decoder, cache_length_for
from .token_ids import check_token_ids
from .tokenizer import Tokenizer

MODES = ("int4", "lookup")
MAX_DRAFT_TOKENS = 32
DRAFT_GROUP_SIZE = 32


# -- processed distributions (the same steps as plain sampling, generate.next_tokens) ---------------
class Processor:
    """Turns raw logits ``[V]`` into the logits sampling draws from, tracking the penalties' state
    (tokens seen, counts of generated tokens) as tokens are appended."""

    def __init__(
        self, params: SamplingParams, prompt: list[int], vocab_size: int, device: torch.device
    ):
        self.params = params
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(prompt, device=device)] = True
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(1, vocab_size, device=device)

    @property
    def stateful(self) -> bool:
        return self.seen is not None or self.counts is not None

    def fork(self) -> "Processor":
        """A copy whose state can run ahead over draft tokens."""
        other = copy.copy(self)
        other.seen = None if self.seen is None else self.seen.clone()
        other.counts = None if self.counts is None else self.counts.clone()
        return other

    def append(self, token: int) -> None:
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Processed float32 logits ``[V]`` (greedy: after the penalties only)."""
        p = self.params
        logits = raw.float()[None]
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, p.repetition_penalty)
        if self.counts is not None:
            logits = apply_frequency_presence(
                logits, self.counts, p.frequency_penalty, p.presence_penalty
            )
        if not p.greedy:
            logits = (logits - logits.amax(-1, keepdim=True)) / p.temperature
            logits = apply_min_p(apply_top_p(apply_top_k(logits, p.top_k), p.top_p), p.min_p)
        return logits[0]

    def probs(self, raw: torch.Tensor) -> torch.Tensor:
        return self.logits(raw).softmax(-1)


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor | None, token: int, generator: torch.Generator | None
) -> int | None:
    """The standard acceptance rule for one draft token: None when ``token`` is kept (probability
    ``min(1, p[token] / q[token])``), else a token drawn from ``norm(max(0, p - q))``. ``q`` None is a
    deterministic draft (one-hot on ``token``)."""
    q_token = 1.0 if q is None else float(q[token])
    u = float(torch.rand((), generator=generator, device=p.device))
    if u * q_token < float(p[token]):
        return None
    if q is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = (p - q).clamp_(min=0.0)
    # p <= q everywhere up to rounding: p itself is the residual's limit
    if float(residual.sum()) <= 0.0:
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator))


# -- drafts ---------------------------------------------------------------------------------------
class LookupDraft:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the sequence's
    last ``n``-gram, ``n`` from ``max_ngram`` down to ``min_ngram``. The draft is deterministic."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(
        self, sequence: list[int], k: int, processor: Processor, generator: torch.Generator | None
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        n_tokens = len(sequence)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            tail = sequence[-n:]
            # most recent first, the tail itself excluded
            for start in range(n_tokens - n - 1, -1, -1):
                if sequence[start : start + n] == tail:
                    follow = sequence[start + n : start + n + k]
                    return follow, [None] * len(follow)
        return [], []

    def rollback(self, kept: int) -> None:
        """Nothing to undo: the draft keeps no state."""


class ModelDraft:
    """A draft model with its own KV cache, decoding ``k`` tokens per proposal."""

    def __init__(self, model: nn.Module, cache_length: int):
        self.model = model
        self.cache = model.new_cache(1, cache_length)
        self.decoder = Decoder(model, self.cache)
        self.fed = 0  # tokens of the sequence in the draft's cache

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        device = self.cache.keys[0].device
        if len(tokens) == 1:
            position = torch.tensor([[self.cache.length]], device=device)
            logits = self.decoder.step(torch.tensor([tokens], device=device), position)[0]
        else:
            logits = self.model(
                torch.tensor([tokens], device=device), cache=self.cache, last_only=True
            )[0, -1]
        self.fed += len(tokens)
        return logits

    def propose(
        self, sequence: list[int], k: int, processor: Processor, generator: torch.Generator | None
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """``k`` draft tokens after ``sequence`` and the distribution each was drawn from (None: greedy)."""
        draft: list[int] = []
        dists: list[torch.Tensor | None] = []
        state = processor.fork() if processor.stateful else processor
        logits = self._feed(sequence[self.fed :])
        while True:
            if processor.params.greedy:
                token, dist = int(state.logits(logits).argmax()), None
            else:
                dist = state.probs(logits)
                token = int(torch.multinomial(dist, 1, generator=generator))
            draft.append(token)
            dists.append(dist)
            if len(draft) == k:
                return draft, dists
            if state is not processor:
                state.append(token)
            logits = self._feed([token])

    def rollback(self, kept: int) -> None:
        """Keep the cache up to the sequence's first ``kept`` tokens (the rest are fed next time)."""
        self.fed = min(self.fed, kept)
        self.cache.length = self.fed


_DRAFTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]]" = (
    weakref.WeakKeyDictionary()
)


def _stamp(model: nn.Module) -> tuple:
    return tuple((id(t), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


@torch.inference_mode(False)
@torch.no_grad()
def int4_draft(model: nn.Module, group_size: int = DRAFT_GROUP_SIZE) -> nn.Module:
    """The model with every projection and the output head as int4 in groups of ``group_size``
    (float, int8 and int4 projections alike; int4 ones are shared, not copied). Everything else
    (embedding, norms, RoPE tables) is shared with ``model``. Made once per model and weights."""
    from .quant.linear import Int4Linear, QuantizedLinear
    from .quant.model import _bias_for
    from .quant.tensors import quantize_int4

    stamp = _stamp(model)
    cached = _DRAFTS.get(model)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    draft = copy.deepcopy(model, shared)
    names = [
        name for name, m in draft.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))
    ]
    device = model.device
    for name in names:
        module = draft.get_submodule(name)
        if isinstance(module, Int4Linear) or module.in_features % group_size:
            continue
        if isinstance(module, nn.Linear):
            weight, bias = module.weight, _bias_for(draft, name, module.bias)
        else:
            weight, bias = module.dequantize(torch.float32), module.bias
        draft.set_submodule(
            name, Int4Linear(quantize_int4(weight, group_size), bias, device=device)
        )
    if draft.lm_head is None and draft.config.hidden_size % group_size == 0:
        embed = draft.embed
        table = embed.weight if isinstance(embed, nn.Embedding) else embed.dequantize()
        draft.lm_head = Int4Linear(quantize_int4(table, group_size), None, device=device)
    draft.eval()
    _DRAFTS[model] = (stamp, draft)
    return draft


# -- the run --------------------------------------------------------------------------------------
@dataclass
class SpeculativeStats(GenerationStats):
    drafted_tokens: int = 0  # draft tokens proposed
    accepted_tokens: int = 0  # of those, kept by the target
    verifications: int = 0  # target forwards after the prefill

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


def check_options(mode: str, draft_tokens: int) -> None:
    """Refuse an unknown draft kind or draft length (before any model is loaded)."""
    if mode not in MODES:
        raise LlamakinError(f"unknown speculation {mode!r}; use one of {', '.join(MODES)}.")
    if not (
        isinstance(draft_tokens, int)
        and not isinstance(draft_tokens, bool)
        and 1 <= draft_tokens <= MAX_DRAFT_TOKENS
    ):
        raise LlamakinError(
            f"draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}; got {draft_tokens!r}."
        )


def check_speculation(model, mode: str, draft_tokens: int, prompts: int = 1) -> None:
    check_options(mode, draft_tokens)
    if prompts != 1:
        raise LlamakinError(
            f"speculative decoding runs one prompt at a time, not a batch of {prompts}; "
            "generate them one by one or without speculation."
        )
    if model.config.prefix_lm:
        raise LlamakinError(
            "speculative decoding does not support prefix-LM models (ChatGLM-6B); "
            "generate without speculation."
        )


class SpeculativeRun:
    """Like :class:`llamakin.generate.GenerationRun` for one prompt: an iterator over ``(0, text
    piece)``; ``results`` and ``stats`` (a :class:`SpeculativeStats`) complete once exhausted.
    ``draft`` overrides the draft model of ``mode="int4"`` (any model over the same vocabulary)."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        prompt: list[int],
        params: SamplingParams,
        mode: str = "lookup",
        draft_tokens: int = 4,
        draft: nn.Module | None = None,
    ):
        check_speculation(model, mode, draft_tokens)
        if not prompt:
            raise LlamakinError(
                "every prompt needs at least one token; an empty prompt gives the model nothing to continue."
            )
        check_token_ids(prompt, model.config.vocab_size, "the prompt")
        context = model.config.max_position_embeddings
        if len(prompt) + params.max_new_tokens > context and not model.config.rope_extends_context:
            raise LlamakinError(
                f"the prompt has {len(prompt)} tokens and max_new_tokens is {params.max_new_tokens}, together more "
                f"than the model's context of {context}; shorten the prompt or lower max_new_tokens."
            )
        if draft is not None and draft.config.vocab_size != model.config.vocab_size:
            raise LlamakinError(
                f"the draft model has {draft.config.vocab_size} tokens but the model "
                f"{model.config.vocab_size}; a draft must share the model's vocabulary."
            )
        self.model, self.tokenizer, self.prompt, self.params = (
            model,
            tokenizer,
            list(prompt),
            params,
        )
        self.mode, self.draft_tokens, self.draft_model = mode, draft_tokens, draft
        self.results = [RowResult()]
        self.stats = SpeculativeStats(prompt_tokens=len(prompt), rows=1)
        self._iterator = self._run()

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self._iterator

    def __next__(self) -> tuple[int, str]:
        return next(self._iterator)

    def _drafter(self, cache_length: int):
        if self.mode == "lookup" and self.draft_model is None:
            return LookupDraft()
        return ModelDraft(self.draft_model or int4_draft(self.model), cache_length)

    @torch.inference_mode()
    def _run(self) -> Iterator[tuple[int, str]]:
        model, params, result = self.model, self.params, self.results[0]
        device = model.device
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(
                params.seed if params.seed is not None else int(torch.seed() % 2**63)
            )
        processor = Processor(params, self.prompt, model.config.vocab_size, device)
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_token_ids)
        stream = TextStream(self.tokenizer, params.stop)
        needed = len(self.prompt) + params.max_new_tokens
        length = cache_length_for(needed, max(model.config.max_position_embeddings, needed))
        cache = self.cache = model.new_cache(1, length)
        drafter = self._drafter(length)
        decoder = Decoder(model, cache)
        sequence = list(self.prompt)

        start = time.perf_counter()
        # [1, V]
        logits = model(torch.tensor([sequence], device=device), cache=cache, last_only=True)[0]
        self.stats.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        new = [self._choose(processor.logits(logits[0]), generator)]
        while True:
            for token in new:  # emit what this round produced, stopping at the first ending
                if token in eos:
                    result.finish_reason = "stop"
                    break
                processor.append(token)
                sequence.append(token)
                result.token_ids.append(token)
                piece = stream.push(token)
                if piece:
                    result.text += piece
                    yield 0, piece
                if stream.stopped:
                    result.finish_reason = "stop"
                    break
                if len(result.token_ids) >= params.max_new_tokens:
                    result.finish_reason = "length"
                    break
            if result.finish_reason is not None:
                break
            # the cache holds every token but the last; the draft may add at most what is left after it
            k = min(self.draft_tokens, params.max_new_tokens - len(result.token_ids) - 1)
            draft, dists = drafter.propose(sequence, k, processor, generator) if k > 0 else ([], [])
            if not draft:
                position = torch.tensor([[cache.length]], device=device)
                logits = decoder.step(torch.tensor([[sequence[-1]]], device=device), position)
                new = [self._choose(processor.logits(logits[0]), generator)]
                continue
            kept_before = cache.length
            # [k + 1, V]
            logits = model(torch.tensor([[sequence[-1], *draft]], device=device), cache=cache)[0]
            new = self._verify(logits, draft, dists, processor, generator)
            accepted = len(new) - 1
            # rollback: the rejected drafts' slots are dropped
            cache.length = kept_before + 1 + accepted
            drafter.rollback(len(sequence) + accepted)
            self.stats.verifications += 1
            self.stats.drafted_tokens += len(draft)
            self.stats.accepted_tokens += accepted
        tail = stream.finish()
        if tail:
            result.text += tail
            yield 0, tail
        self.stats.decode_seconds = time.perf_counter() - start
        self.stats.generated_tokens = len(result.token_ids)

    def _choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        if self.params.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))

    def _verify(
        self,
        logits: torch.Tensor,
        draft: list[int],
        dists: list[torch.Tensor | None],
        processor: Processor,
        generator: torch.Generator | None,
    ) -> list[int]:
        """The tokens this round adds: the kept prefix of ``draft`` and one token from the target."""
        state = processor.fork() if processor.stateful else processor
        kept: list[int] = []
        for i, token in enumerate(draft):
            processed = state.logits(logits[i])
            if self.params.greedy:
                best = int(processed.argmax())
                if best != token:
                    return kept + [best]
            else:
                other = accept_or_resample(processed.softmax(-1), dists[i], token, generator)
                if other is not None:
                    return kept + [other]
            kept.append(token)
            if state is not processor:
                state.append(token)
        return kept + [self._choose(state.logits(logits[len(draft)]), generator)]


def generate_speculative(
    model,
    tokenizer: Tokenizer,
    prompt,
    *,
    speculate: str = "lookup",
    draft_tokens: int = 4,
    stream: bool = False,
    **sampling,
):
    """:func:`llamakin.generate` with speculative decoding: ``speculate="int4"`` or ``"lookup"``,
    ``draft_tokens`` per draft; ``sampling`` takes generate's sampling keywords (max_new_tokens,
    temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos). Returns the
    text, or with ``stream=True`` a :class:`~llamakin.generate.TextIterator`."""
    from .generate import TextIterator, _params, encode_prompt

    defaults = dict(
        max_new_tokens=256,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        repetition_penalty=1.0,
        seed=None,
        stop=None,
        ignore_eos=False,
    )
    unknown = set(sampling) - set(defaults)
    if unknown:
        raise LlamakinError(
            f"unknown generation option(s) {', '.join(sorted(unknown))}; use {', '.join(defaults)}."
        )
    params = _params(**{**defaults, **sampling})
    run = SpeculativeRun(
        model, tokenizer, encode_prompt(tokenizer, prompt), params, speculate, draft_tokens
    )
    if stream:
        return TextIterator(run)
    for _ in run:
        pass
    return run.results[0].text


def report(stats: SpeculativeStats) -> str:
    """One line for the CLI."""
    return (
        f"[speculation: {stats.accepted_tokens}/{stats.drafted_tokens} draft tokens accepted "
        f"({100 * stats.acceptance_rate:.0f}%) over {stats.verifications} verifications]"
    )
