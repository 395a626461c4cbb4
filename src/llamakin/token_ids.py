"""Token ids checked against a vocabulary: the one input check the model itself needs, kept apart
from :mod:`llamakin.validation` (which builds models to count parameters, so the model cannot
import it)."""

from __future__ import annotations

from typing import Iterable

import torch

from .errors import LlamakinError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_token_ids(
    ids: Iterable[int] | torch.Tensor, vocab_size: int, what: str = "the input"
) -> None:
    """Refuse token ids outside ``[0, vocab_size)`` (an embedding lookup would fail on them)."""
    if isinstance(ids, torch.Tensor):
        if ids.numel() == 0:
            return
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise LlamakinError(
                f"{what} must hold integer token ids, got a {str(ids.dtype).removeprefix('torch.')} "
                "tensor."
            )
        low, high = (int(v) for v in torch.aminmax(ids))
        bad = low if low < 0 else high if high >= vocab_size else None
    else:
        bad = next((i for i in ids if not _is_int(i) or not 0 <= i < vocab_size), None)
    if bad is not None:
        raise LlamakinError(
            f"{what} holds token id {bad!r}, outside the model's vocabulary of {vocab_size} "
            f"(ids 0 to {vocab_size - 1}); encode with the model's own tokenizer."
        )
