"""GGUF's Q4_0, Q4_1 and Q8_0 blocks decoded into their integer values and scales (no rounding).

ggml's block layouts (``ggml-common.h``), 32 weights per block along each row:

* ``Q4_0``: ``fp16 d; uint8 qs[16]`` - ``w[j] = d * (lo(qs[j]) - 8)``, ``w[j + 16] = d * (hi(qs[j]) - 8)``
* ``Q4_1``: ``fp16 d, m; uint8 qs[16]`` - ``w[j] = d * lo(qs[j]) + m``, ``w[j + 16] = d * hi(qs[j]) + m``
* ``Q8_0``: ``fp16 d; int8 qs[32]`` - ``w[j] = d * qs[j]``

:func:`q4_to_int4` maps Q4_0/Q4_1 onto :class:`~llamakin.quant.tensors.Int4Weight` (group 32):
``scale = d``, ``zero = m + 8 d`` (Q4_0: ``zero = 0``), computed in float32. ``(q - 8) d`` is exact
in float32 (an fp16 times a 4-bit integer); ``m + 8 d`` and the final add round once each, so
the mapped weights equal ``d q + m`` to within float32 rounding (measured in the tests).
"""

from __future__ import annotations

import numpy as np
import torch

from .tensors import Int4Weight

BLOCK = 32
KEPT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    rows = raw.shape[0]
    return raw.reshape(rows, -1, block_bytes)


def _halves(blocks: np.ndarray, offset: int) -> np.ndarray:
    return (
        np.ascontiguousarray(blocks[..., offset : offset + 2])
        .view(np.float16)[..., 0]
        .astype(np.float32)
    )


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[rows, blocks, 16]`` bytes -> ``[rows, blocks, 32]`` values: low nibbles first, then high."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def decode_q4(raw: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q uint8 [N, K], d float32 [N, K/32], m float32 [N, K/32])`` of a Q4_0/Q4_1 matrix
    (Q4_0: ``m = -8 d``, so both read ``w = d q + m``)."""
    if kind == "Q4_1":
        b = _blocks(raw, 20)
        d, m, qs = _halves(b, 0), _halves(b, 2), b[..., 4:]
    elif kind == "Q4_0":
        b = _blocks(raw, 18)
        d, qs = _halves(b, 0), b[..., 2:]
        m = -8 * d
    else:
        raise ValueError(kind)
    q = _nibbles(qs).reshape(raw.shape[0], -1)
    return torch.from_numpy(q.copy()), torch.from_numpy(d.copy()), torch.from_numpy(m.copy())


def decode_q8_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [N, K], d float32 [N, K/32])`` of a Q8_0 matrix: ``w = d q``."""
    b = _blocks(raw, 34)
    d = _halves(b, 0)
    q = torch.empty((raw.shape[0], b.shape[1] * BLOCK), dtype=torch.int8)
    q.numpy().reshape(b.shape[0], b.shape[1], BLOCK)[...] = b[..., 2:].view(np.int8)  # one copy
    return q, torch.from_numpy(d)


def q4_to_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Int4Weight:
    """Q4_0/Q4_1 values onto the int4 kernel layout: ``scale = d``, ``zero = m + 8 d``."""
    return Int4Weight(q.contiguous(), d.contiguous(), (m + 8 * d).contiguous(), BLOCK)
