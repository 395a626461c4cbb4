"""Token log-probabilities for the OpenAI API's ``logprobs`` / ``echo`` options.

Computed by one teacher-forced forward pass over the prompt and the completion (the logits at
position ``t - 1`` give token ``t``'s log-probability), with the model's raw distribution, before
any temperature or penalty: what OpenAI and vLLM report. ``echo`` with ``max_tokens: 0`` is how
lm-evaluation-harness's ``local-completions`` model scores text through a server (the prompt's
own token log-probabilities; the first token has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..evaluate import HEAD_ROWS

MAX_TOP_LOGPROBS = 20


@dataclass
class TokenLogprobs:
    """For tokens ``ids[start:]``: each token's log-probability and the ``top`` most likely tokens
    at its position (``(id, logprob)`` pairs, best first). A token at position 0 has neither."""

    ids: list[int]
    start: int
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@torch.inference_mode()
def token_logprobs(
    model, ids: list[int], start: int, top: int, ended_by: Sequence[int] = ()
) -> TokenLogprobs:
    """Log-probabilities of ``ids[start:]`` given what precedes each, and the ``top`` alternatives.

    ``ended_by``: the end-of-sequence ids, when one of them ended the generation (the engine does not
    keep that token): the most likely of them is appended, as OpenAI's logprobs end with it.
    """
    if ended_by:
        tail = model(torch.tensor([ids], device=model.device), hidden_only=True)[0, -1:]
        last = model.head(tail).float().log_softmax(-1)[0]
        ids = ids + [max(ended_by, key=lambda i: last[i].item())]
    first = start
    logprobs: list[float | None] = []
    tops: list[list[tuple[int, float]] | None] = []
    if start == 0:
        logprobs.append(None)
        tops.append(None)
        start = 1
    if start < len(ids):
        hidden = model(torch.tensor([ids], device=model.device), hidden_only=True)[
            0, start - 1 : len(ids) - 1
        ]
        targets = torch.tensor(ids[start:], device=model.device)
        for s in range(0, hidden.shape[0], HEAD_ROWS):
            table = model.head(hidden[s : s + HEAD_ROWS]).float().log_softmax(-1)
            logprobs += table.gather(-1, targets[s : s + HEAD_ROWS, None])[:, 0].tolist()
            if top > 0:
                values, indices = table.topk(top, dim=-1)
                tops += [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
            else:
                tops += [[] for _ in range(table.shape[0])]
    return TokenLogprobs(ids, first, logprobs, tops)


def completions_logprobs(tokenizer, scored: TokenLogprobs) -> dict:
    """The legacy completions shape: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``."""
    tokens = [tokenizer.decode([i]) for i in scored.ids[scored.start :]]
    offsets, position = [], 0
    for piece in tokens:
        offsets.append(position)
        position += len(piece)
    top = []
    for alternatives in scored.top:
        if alternatives is None:
            top.append(None)
            continue
        named: dict[str, float] = {}
        for i, lp in alternatives:  # best first; two ids that decode alike keep the better one
            named.setdefault(tokenizer.decode([i]), lp)
        top.append(named)
    return {
        "tokens": tokens,
        "token_logprobs": scored.logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, scored: TokenLogprobs) -> dict:
    """The chat completions shape: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""

    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, logprob, top in zip(scored.ids[scored.start :], scored.logprobs, scored.top):
        content.append(
            {**entry(token_id, logprob), "top_logprobs": [entry(i, lp) for i, lp in top or []]}
        )
    return {"content": content}
