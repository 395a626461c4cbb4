"""Pure weight transforms used by the checkpoint adapters, each next to its inverse.

All functions take and return tensors without copying more than needed, work on any dtype and
on ``meta`` tensors (so the adapters can derive expected checkpoint shapes without data), and
are tested in round trips (``tests/test_transforms.py``).
"""

from __future__ import annotations

import torch


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack row blocks (a fused ``[q | k | v]`` or ``[gate | up]`` from separate matrices)."""
    return torch.cat(parts, dim=0)


def split_rows(fused: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Inverse of :func:`concat_rows`."""
    return list(fused.split(list(sizes), dim=0))


def _regroup_rotary_rows(w: torch.Tensor, n_heads: int, rotary_dim: int, pairs_first: bool) -> torch.Tensor:
    rest = w.shape[1:]
    heads = w.reshape(n_heads, -1, *rest)  # [n_heads, head_dim, *rest]
    half = rotary_dim // 2
    grid = (half, 2) if pairs_first else (2, half)
    rotary = heads[:, :rotary_dim].reshape(n_heads, *grid, *rest).transpose(1, 2).reshape(n_heads, rotary_dim, *rest)
    return torch.cat((rotary, heads[:, rotary_dim:]), dim=1).reshape(w.shape)


def interleaved_to_half(w: torch.Tensor, n_heads: int, rotary_dim: int | None = None) -> torch.Tensor:
    """Reorder q or k rows from the interleaved (Meta) RoPE order to the rotate_half (HF) order.

    Within the first ``rotary_dim`` rows of each head, HF row ``j * rd/2 + i`` takes Meta row
    ``2i + j`` (spec §2.3, ``convert_llama_weights_to_hf.permute``). Works on weights ``[n*hd, d]``
    and on biases ``[n*hd]`` alike: forgetting the bias is the Granite Code bug of spec §2.3.
    Rows past ``rotary_dim`` (partial rotary) stay in place.
    """
    rotary_dim = w.shape[0] // n_heads if rotary_dim is None else rotary_dim
    return _regroup_rotary_rows(w, n_heads, rotary_dim, pairs_first=True)


def half_to_interleaved(w: torch.Tensor, n_heads: int, rotary_dim: int | None = None) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_half` (torchchat's ``permute``, spec §2.3)."""
    rotary_dim = w.shape[0] // n_heads if rotary_dim is None else rotary_dim
    return _regroup_rotary_rows(w, n_heads, rotary_dim, pairs_first=False)


def rope_reorder(w: torch.Tensor, n_heads: int, rotary_dim: int, source: str, target: str) -> torch.Tensor:
    """Reorder rows from RoPE layout ``source`` to ``target`` (``half`` or ``interleaved``)."""
    if source == target:
        return w
    if (source, target) == ("interleaved", "half"):
        return interleaved_to_half(w, n_heads, rotary_dim)
    if (source, target) == ("half", "interleaved"):
        return half_to_interleaved(w, n_heads, rotary_dim)
    raise ValueError(f"unknown RoPE layouts {source!r} -> {target!r}")
