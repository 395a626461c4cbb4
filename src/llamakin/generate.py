"""Text generation: sampling, stopping, streaming and batches of prompts.

Prefill runs the whole prompt once into a static KV cache sized for the request; each decode
step feeds one token per row. Several prompts run as one left-padded batch. Sampling follows
transformers' order: repetition penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .errors import LlamakinError
from .model.decode import Decoder, cache_length_for
from .model.positions import position_tracker
from .token_ids import check_token_ids
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy; 0 / 1.0 disable top-k / top-p."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: minus penalty x count, over the generated tokens
    presence_penalty: float = 0.0  # OpenAI's: minus penalty once a token has been generated
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(s for s in (self.stop or ()) if s))
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be 0 (greedy) or a positive number"),
            (self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                   and -2**63 <= self.seed < 2**64), "seed must be an integer from -2^63 to 2^64 - 1"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be 0 (off) or a positive integer"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be positive (1.0 is off)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be between -2 and 2"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be between -2 and 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlamakinError(f"{message}; got {self._show()}.")

    def _show(self) -> str:
        return (f"max_new_tokens={self.max_new_tokens}, temperature={self.temperature}, top_k={self.top_k}, "
                f"top_p={self.top_p}, min_p={self.min_p}, repetition_penalty={self.repetition_penalty}, "
                f"seed={self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# -- logits processors (each a pure function on float32 [B, V] logits) ----------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the row (prompt and output): positive logits
    are divided by ``penalty``, negative ones multiplied. ``seen`` is a bool ``[B, V]`` mask."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                             presence: float) -> torch.Tensor:
    """OpenAI's penalties: ``logit - frequency * count - presence * (count > 0)`` per generated token."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly ahead of each token
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely one."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def next_tokens(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                generator: torch.Generator | None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Choose one token per row from the last-position logits ``[B, V]``.

    ``seen`` marks tokens of the prompt and output (repetition penalty); ``counts`` counts the
    generated tokens (frequency/presence penalties)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and counts is not None:
        logits = apply_frequency_presence(logits, counts, params.frequency_penalty, params.presence_penalty)
    if params.greedy:
        return logits.argmax(-1)
    # shifted so each row's best logit is 0 first: softmax is unchanged, and a tiny temperature
    # (1e-45) drives the others to -inf instead of overflowing every logit to inf (NaN probabilities)
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    logits = apply_min_p(apply_top_p(apply_top_k(logits, params.top_k), params.top_p), params.min_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# -- text streaming ------------------------------------------------------------------------------
class TextStream:
    """Turns one row's token ids into text pieces that are safe to show.

    * Incremental detokenization: a piece is emitted only once it no longer ends in an
      incomplete UTF-8 sequence (the tokenizer shows those as U+FFFD); decoding always includes a
      few previous tokens so tokenizers that strip a leading space get spacing right.
    * Stop strings: text that could still become the start of a stop string is held back, and
      when one completes, everything from it on is dropped.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded so far (before stop handling)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode_new(self) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) < len(prefix):
            return ""  # an incomplete multi-byte character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.text += self._decode_new()
        return self._release(final=False)

    def finish(self) -> str:
        """Everything still held back (at the end of generation)."""
        if not self.stopped and self.read_offset < len(self.ids):
            tail = self.tokenizer.decode(self.ids[self.prefix_offset:])
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += tail[len(prefix):]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            window_start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, window_start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[:min(hits)]
        end = len(self.text)
        if self.stop and not self.stopped and not final:
            end -= self._held_back()
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest


# -- the generation loop ---------------------------------------------------------------------------
@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    rows: int = 1

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second over all rows, counting only tokens from decode steps (each row's
        first token comes from the prefill)."""
        decoded = max(self.generated_tokens - self.rows, 0)
        return decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


@dataclass
class RowResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[int] | list[dict[str, Any]]) -> list[int]:
    """Token ids for a plain prompt, pre-tokenized ids, or a chat (list of messages)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        # the rendered template already carries the special tokens the model expects
        return tokenizer.encode(tokenizer.apply_chat_template(prompt), add_special_tokens=False)
    if all(isinstance(i, int) for i in prompt):
        return list(prompt)
    raise LlamakinError("a prompt must be a string, a list of token ids or a list of chat messages.")


class GenerationRun:
    """An iterator over ``(row, text piece)`` for a batch of prompts; ``results`` and ``stats``
    are complete once it is exhausted."""

    def __init__(self, model, tokenizer: Tokenizer, prompts: list[list[int]], params: SamplingParams):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LlamakinError("every prompt needs at least one token; an empty prompt gives the model nothing to continue.")
        for n, prompt in enumerate(prompts):
            check_token_ids(prompt, model.config.vocab_size, "the prompt" if len(prompts) == 1 else f"prompt {n}")
        context = model.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest + params.max_new_tokens > context:
            if not model.config.rope_extends_context:
                raise LlamakinError(
                    f"the prompt has {longest} tokens and max_new_tokens is {params.max_new_tokens}, together more "
                    f"than the model's context of {context}; shorten the prompt or lower max_new_tokens."
                )
            print(f"llamakin: note: generating up to {longest + params.max_new_tokens} tokens, past the model's trained "
                  f"context of {context}, which its {model.config.rope_scaling.type} RoPE scaling extends.",
                  file=sys.stderr)
        self.model, self.tokenizer, self.prompts, self.params = model, tokenizer, prompts, params
        self.results = [RowResult() for _ in prompts]
        self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), rows=len(prompts))
        self._iterator = self._run()

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self._iterator

    def __next__(self) -> tuple[int, str]:
        return next(self._iterator)

    @torch.inference_mode()
    def _run(self) -> Iterator[tuple[int, str]]:
        model, params = self.model, self.params
        device = model.device
        B = len(self.prompts)
        longest = max(len(p) for p in self.prompts)
        ids = torch.full((B, longest), self.tokenizer.eos_token_ids[0] if self.tokenizer.eos_token_ids else 0,
                         dtype=torch.long)
        mask = torch.zeros((B, longest), dtype=torch.long)
        for row, p in enumerate(self.prompts):
            ids[row, longest - len(p):] = torch.tensor(p)
            mask[row, longest - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = bool((mask == 0).any())
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed if params.seed is not None else int(torch.seed() % 2**63))
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
            for row, p in enumerate(self.prompts):
                seen[row, torch.tensor(p, device=device)] = True

        counts = None
        if params.frequency_penalty or params.presence_penalty:
            counts = torch.zeros(B, model.config.vocab_size, device=device)
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_token_ids)
        streams = [TextStream(self.tokenizer, params.stop) for _ in range(B)]
        active = list(range(B))
        needed = longest + params.max_new_tokens
        cache = model.new_cache(B, cache_length_for(needed, max(model.config.max_position_embeddings, needed)))

        decoder = Decoder(model, cache)  # traces the decode step on first use of this shape
        tracker = position_tracker(model.config)
        prompt_positions, _ = tracker.prompt(ids, mask.bool() if padded else None)
        start = time.perf_counter()
        logits = model(ids, attention_mask=mask if padded else None, position_ids=prompt_positions, cache=cache,
                       last_only=True)[:, -1]
        self.stats.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(params.max_new_tokens):
            chosen = next_tokens(logits, params, seen, generator, counts)
            if seen is not None:
                seen[torch.arange(B, device=device), chosen] = True
            if counts is not None:
                counts[torch.arange(B, device=device), chosen] += 1
            chosen_list = chosen.tolist()
            still = []
            for row in active:
                token = chosen_list[row]
                result = self.results[row]
                if token in eos:
                    result.finish_reason = "stop"
                else:
                    result.token_ids.append(token)
                    piece = streams[row].push(token)
                    if piece:
                        result.text += piece
                        yield row, piece
                    if streams[row].stopped:
                        result.finish_reason = "stop"
                    elif len(result.token_ids) >= params.max_new_tokens:
                        result.finish_reason = "length"
                if result.finish_reason is None:
                    still.append(row)
                else:
                    tail = streams[row].finish()
                    if tail:
                        result.text += tail
                        yield row, tail
            active = still
            if not active:
                break
            logits = decoder.step(chosen[:, None], tracker.step())
        self.stats.decode_seconds = time.perf_counter() - start
        self.stats.generated_tokens = sum(len(r.token_ids) for r in self.results)


def _params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos):
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                          stop=tuple([stop] if isinstance(stop, str) else (stop or ())), ignore_eos=ignore_eos)


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


def generate(model, tokenizer: Tokenizer, prompt: str | list[int] | list[dict[str, Any]], *,
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: Sequence[str] | str | None = None, ignore_eos: bool = False, stream: bool = False):
    """Continue ``prompt`` (a string, token ids, or chat messages rendered with the model's template).

    Returns the generated text, or with ``stream=True`` an iterator of text pieces (a
    :class:`TextIterator`, whose ``stats`` hold token counts and speeds once it is exhausted).
    """
    params = _params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos)
    run = GenerationRun(model, tokenizer, [encode_prompt(tokenizer, prompt)], params)
    if stream:
        return TextIterator(run)
    for _ in run:
        pass
    return run.results[0].text


def generate_batch(model, tokenizer: Tokenizer, prompts: Sequence[str | list[int] | list[dict[str, Any]]], *,
                   max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                   stop: Sequence[str] | str | None = None, ignore_eos: bool = False) -> list[str]:
    """Generate for several prompts at once in one left-padded batch; one text per prompt."""
    params = _params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos)
    run = GenerationRun(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], params)
    for _ in run:
        pass
    return [r.text for r in run.results]
