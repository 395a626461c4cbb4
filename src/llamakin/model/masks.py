"""Attention masks over the key/value cache: prompts (causal, sliding window, padding, prefix LM)
and one-token decode steps (docs/variants.md §8.2, §6.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMask:
    """What SDPA needs: an explicit mask (boolean, True = attend; or additive, 0 / ``-inf``, in the
    activations' dtype) or the ``is_causal`` fast path."""

    mask: torch.Tensor | None
    is_causal: bool


def build_mask(
    key_valid: torch.Tensor | None,
    past: int,
    new: int,
    window: int | None,
    device: torch.device,
    prefix_end: torch.Tensor | None = None,
) -> AttentionMask:
    """Mask for ``new`` queries at slots ``past .. past+new-1`` over keys at slots ``0 .. past+new-1``.

    A key is visible when it is not in the future, inside the sliding window if any
    (``q - window < k``, HF's ``sliding_window_overlay``) and not padding. Each query always sees
    itself, so a padding token's row is never empty (an all-masked row would make NaNs that
    then leak into later layers through that token's keys and values). With ``prefix_end`` ``[B]``
    (a prefix LM, docs/variants.md §6.1) the keys before that slot are visible to every query.
    """
    if key_valid is None and window is None and prefix_end is None:
        if new == 1:
            return AttentionMask(None, False)
        if past == 0:
            return AttentionMask(None, True)
    total = past + new
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[None]  # [1 or B, T, S]
    if prefix_end is not None:
        allowed = allowed | (k_pos[None] < prefix_end[:, None, None])
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, :]) | (k_pos == q_pos)[None]
    return AttentionMask(allowed[:, None], False)


def decode_masks(
    key_valid: torch.Tensor,
    slots: torch.Tensor,
    windows: set[int | None],
    dtype: torch.dtype = torch.float32,
) -> dict[int | None, AttentionMask]:
    """Masks for one new token per row, at cache slot ``slots[b]``, over every slot of the cache.

    Additive masks in ``dtype`` (0 where a key is visible, ``-inf`` where not), built once per
    step: ``scaled_dot_product_attention`` turns a boolean mask into exactly this one
    (``where(mask, 0, -inf)``) inside every call, i.e. in every layer (two kernels per layer,
    measured in ``benchmarks/bench_decode_step.py``); given the additive mask the results are
    bit-identical (tested).
    """
    k_pos = torch.arange(key_valid.shape[1], device=key_valid.device)[None]
    slots = slots[:, None]
    visible = (k_pos <= slots) & key_valid  # [B, S]
    masks = {}
    for window in windows:
        allowed = visible if window is None else visible & (k_pos > slots - window)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        masks[window] = AttentionMask(
            additive.masked_fill_(~allowed, float("-inf"))[:, None, None, :], False
        )
    return masks
