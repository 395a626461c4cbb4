"""Position ids for prompts and decode steps.

Most models count real tokens (left padding excluded). ChatGLM-6B's prefix LM (docs/variants.md §6.1) uses
two streams: up to the start-of-piece token ``<sop>`` (index ``ctx``) positions count tokens and
block positions are 0; from ``<sop>`` on, every token takes the position of the mask token
(``[gMASK]``/``[MASK]``) and block positions count 1, 2, 3, ... The prompt up to ``ctx`` is
attended bidirectionally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import LlamakinError


class LinearPositions:
    """Positions that count real tokens: ``cumsum(mask) - 1`` for the prompt, then one more per step."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.next: torch.Tensor | None = None

    def prompt(
        self, ids: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position ids ``[B, T]`` for a prompt, and the prefix-LM bound (None here)."""
        if valid is None:
            positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        else:
            positions = positions_from_valid(valid, 0)
        self.next = positions[:, -1:] + 1
        return positions, None

    def step(self) -> torch.Tensor:
        """Positions ``[B, 1]`` of the next decode step."""
        current, self.next = self.next, self.next + 1
        return current


@dataclass
class _Row:
    ctx: int  # index of <sop> among the row's real tokens (the prefix length)
    mask_position: int
    length: int  # real tokens so far


class PrefixLMPositions:
    """ChatGLM-6B's 2-D positions and prefix bound (docs/variants.md §6.1)."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.rows: list[_Row] = []
        self.device = torch.device("cpu")

    def _row(self, tokens: list[int]) -> _Row:
        c = self.config
        ctx = tokens.index(c.sop_token_id) if c.sop_token_id in tokens else len(tokens)
        for mask_id in c.mask_token_ids:  # [gMASK] before [MASK], as the reference does
            if mask_id in tokens[:ctx]:
                return _Row(ctx, tokens.index(mask_id), len(tokens))
        raise LlamakinError(
            "a prefix-LM prompt needs a [gMASK] or [MASK] token before <sop>; the tokenizer "
            "adds them, so encode the prompt with special tokens."
        )

    def prompt(
        self, ids: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids ``[B, 2, T]`` and the prefix end (a cache slot) per row ``[B]``."""
        B, T = ids.shape
        positions = torch.zeros(B, 2, T, dtype=torch.long)
        prefix_end = torch.zeros(B, dtype=torch.long)
        self.rows = []
        for b in range(B):
            pad = 0 if valid is None else int((~valid[b]).sum())
            row = self._row(ids[b, pad:].tolist())
            self.rows.append(row)
            p = torch.arange(T - pad)
            positions[b, 0, pad:] = torch.where(
                p < row.ctx, p, torch.full_like(p, row.mask_position)
            )
            positions[b, 1, pad:] = torch.where(p < row.ctx, torch.zeros_like(p), p - row.ctx + 1)
            prefix_end[b] = pad + row.ctx
        self.device = ids.device
        return positions.to(ids.device), prefix_end.to(ids.device)

    def step(self) -> torch.Tensor:
        out = torch.tensor(
            [[[r.mask_position], [r.length - r.ctx + 1]] for r in self.rows], device=self.device
        )
        for r in self.rows:
            r.length += 1
        return out


def position_tracker(config: ModelConfig) -> LinearPositions | PrefixLMPositions:
    return PrefixLMPositions(config) if config.prefix_lm else LinearPositions(config)


def positions_from_valid(key_valid: torch.Tensor, past: int) -> torch.Tensor:
    """Position ids ``[B, new]`` counting only real tokens (HF's ``cumsum(mask) - 1``; pads get 0)."""
    return (key_valid.long().cumsum(-1) - 1).clamp_(min=0)[:, past:]
