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


def _regroup_rotary_rows(
    w: torch.Tensor, n_heads: int, rotary_dim: int, pairs_first: bool
) -> torch.Tensor:
    rest = w.shape[1:]
    heads = w.reshape(n_heads, -1, *rest)  # [n_heads, head_dim, *rest]
    half = rotary_dim // 2
    grid = (half, 2) if pairs_first else (2, half)
    rotary = (
        heads[:, :rotary_dim]
        .reshape(n_heads, *grid, *rest)
        .transpose(1, 2)
        .reshape(n_heads, rotary_dim, *rest)
    )
    return torch.cat((rotary, heads[:, rotary_dim:]), dim=1).reshape(w.shape)


def interleaved_to_half(
    w: torch.Tensor, n_heads: int, rotary_dim: int | None = None
) -> torch.Tensor:
    """Reorder q or k rows from the interleaved (Meta) RoPE order to the rotate_half (HF) order.

    Within the first ``rotary_dim`` rows of each head, HF row ``j * rd/2 + i`` takes Meta row
    ``2i + j`` (docs/variants.md §2.3, ``convert_llama_weights_to_hf.permute``). Works on weights ``[n*hd, d]``
    and on biases ``[n*hd]`` alike: forgetting the bias is the Granite Code bug of docs/variants.md §2.3.
    Rows past ``rotary_dim`` (partial rotary) stay in place.
    """
    rotary_dim = w.shape[0] // n_heads if rotary_dim is None else rotary_dim
    return _regroup_rotary_rows(w, n_heads, rotary_dim, pairs_first=True)


def half_to_interleaved(
    w: torch.Tensor, n_heads: int, rotary_dim: int | None = None
) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_half` (torchchat's ``permute``, docs/variants.md §2.3)."""
    rotary_dim = w.shape[0] // n_heads if rotary_dim is None else rotary_dim
    return _regroup_rotary_rows(w, n_heads, rotary_dim, pairs_first=False)


def rope_reorder(
    w: torch.Tensor, n_heads: int, rotary_dim: int, source: str, target: str
) -> torch.Tensor:
    """Reorder rows from RoPE layout ``source`` to ``target`` (``half`` or ``interleaved``)."""
    if source == target:
        return w
    if (source, target) == ("interleaved", "half"):
        return interleaved_to_half(w, n_heads, rotary_dim)
    if (source, target) == ("half", "interleaved"):
        return half_to_interleaved(w, n_heads, rotary_dim)
    raise ValueError(f"unknown RoPE layouts {source!r} -> {target!r}")


def grouped_qkv_to_fused(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """InternLM2's ``wqkv`` (per KV group: its ``n_rep`` query heads, then k, then v) -> ``[q | k | v]``.

    Query head ``g * n_rep + r`` comes from group g's r-th block, which is exactly the grouping
    ``repeat_kv`` assumes (docs/variants.md §5.5, ``convert2llama.py``). Weights ``[rows, d]`` or biases ``[rows]``.
    """
    n_rep = num_heads // num_kv_heads
    groups = w.reshape(num_kv_heads, n_rep + 2, -1, *w.shape[1:])  # [Hkv, n_rep + 2, hd, ...]
    q = groups[:, :n_rep].reshape(-1, *w.shape[1:])
    return torch.cat(
        (
            q,
            groups[:, n_rep].reshape(-1, *w.shape[1:]),
            groups[:, n_rep + 1].reshape(-1, *w.shape[1:]),
        )
    )


def fused_qkv_to_grouped(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Inverse of :func:`grouped_qkv_to_fused`."""
    n_rep = num_heads // num_kv_heads
    hd = w.shape[0] // (num_heads + 2 * num_kv_heads)
    q, k, v = w.split((num_heads * hd, num_kv_heads * hd, num_kv_heads * hd))
    rest = w.shape[1:]
    parts = (
        q.reshape(num_kv_heads, n_rep, hd, *rest),
        k.reshape(num_kv_heads, 1, hd, *rest),
        v.reshape(num_kv_heads, 1, hd, *rest),
    )
    return torch.cat(parts, dim=1).reshape(w.shape)


def per_head_qkv_to_fused(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """ChatGLM-6B's ``query_key_value`` (per head: ``[q_h | k_h | v_h]``) -> ``[q | k | v]`` (docs/variants.md §6.1)."""
    heads = w.reshape(num_heads, 3, -1, *w.shape[1:])  # [H, 3, hd, ...]
    return heads.transpose(0, 1).reshape(w.shape)


def fused_to_per_head_qkv(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`per_head_qkv_to_fused`."""
    parts = w.reshape(3, num_heads, -1, *w.shape[1:])  # [3, H, hd, ...]
    return parts.transpose(0, 1).reshape(w.shape)


def adjacent_pairs_to_halves(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder ``num_heads`` head blocks of rows from unilm's adjacent pairs (2i, 2i+1) to HF
    DiffLlama's halves (j, j + H/2): HF head j <- head 2j, HF head j + H/2 <- head 2j + 1 (docs/variants.md §7.3)."""
    heads = w.reshape(num_heads // 2, 2, -1, *w.shape[1:])  # [pairs, 2, hd, ...]
    return heads.transpose(0, 1).reshape(w.shape)


def halves_to_adjacent_pairs(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`adjacent_pairs_to_halves`."""
    heads = w.reshape(2, num_heads // 2, -1, *w.shape[1:])
    return heads.transpose(0, 1).reshape(w.shape)
