"""Quantized weight matrices, independent of any kernel: the values, their scales, how to make them.

Two layouts, both for a weight ``W [N, K]`` (output rows ``N``, input columns ``K``):

* :class:`Int8Weight` - int8 weight-only, one scale per output row (per channel):
  ``W[n, k] = q[n, k] * scale[n]``, ``q`` in ``[-127, 127]`` (symmetric; -128 unused).
* :class:`Int4Weight` - int4 weight-only in groups of ``group_size`` input columns, asymmetric:
  ``W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]`` with ``g = k // group_size`` and ``q`` in
  ``[0, 15]``. This is the formula of PyTorch's int4 kernels (``_weight_int4pack_mm`` and
  ``_weight_int4pack_mm_for_cpu``, the "tinygemm" layout torchao also uses), and GGUF's Q4_0
  (``d * (q - 8)``: ``scale = d``, ``zero = 0``) and Q4_1 (``d * q + m``: ``scale = d``,
  ``zero = m + 8 d``) map onto it exactly.

Scales and zeros are kept in float32 here; the kernels round them to their activation dtype
(see :mod:`llamakin.quant.kernels`). ``q`` of int4 is held one value per byte (``uint8``) until
a kernel packs it; files store two per byte (:mod:`llamakin.quant.files`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LlamakinError

GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class Int8Weight:
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [N]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scales[:, None]).to(dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)


@dataclass
class Int4Weight:
    q: torch.Tensor  # uint8 [N, K], values 0..15
    scales: torch.Tensor  # float32 [N, K // group_size]
    zeros: torch.Tensor  # float32 [N, K // group_size]
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K = self.q.shape
        g = self.group_size
        q = self.q.to(torch.float32).view(N, K // g, g)
        w = (q - 8) * self.scales[..., None] + self.zeros[..., None]
        return w.view(N, K).to(dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


def check_group_size(group_size: int, in_features: int, where: str = "") -> None:
    if group_size not in GROUP_SIZES:
        raise LlamakinError(
            f"int4 group size {group_size} is not supported{where}; use one of "
            f"{', '.join(map(str, GROUP_SIZES))}."
        )
    if in_features % group_size:
        raise LlamakinError(
            f"a matrix with {in_features} input features{where} cannot be split into groups of "
            f"{group_size}; use a group size that divides it (e.g. 32)."
        )


ROWS_PER_SLICE = 4096  # quantizers work on row slices: no float32 copy of a large matrix at once


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-row int8 (round to nearest): ``scale = max|W[n]| / 127``."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_PER_SLICE):
        w = weight[start : start + ROWS_PER_SLICE].detach().to(torch.float32)
        s = w.abs().amax(dim=1).div(127.0)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q[start : start + ROWS_PER_SLICE] = torch.round(w / safe[:, None]).clamp_(-127, 127)
        scales[start : start + ROWS_PER_SLICE] = s
    return Int8Weight(q, scales)


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> Int4Weight:
    """Asymmetric group-wise int4 (min/max, round to nearest), the layout of :class:`Int4Weight`:
    ``scale = (max - min) / 15``, ``q = round((w - min) / scale)``, ``zero = min + 8 scale``."""
    N, K = weight.shape
    check_group_size(group_size, K)
    w = weight.detach().to(torch.float32).reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = (hi - lo) / 15.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((w - lo[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    zeros = lo + 8 * scales
    return Int4Weight(
        q.reshape(N, K).contiguous(), scales.contiguous(), zeros.contiguous(), group_size
    )


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K]`` of values 0..15 -> ``uint8 [N, K / 2]``, column ``2j`` in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1).contiguous()


def compact_scales(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 scales and zeros held in half the memory where that loses nothing: the float16 bit
    patterns (``int16``, so a model's ``.to(dtype)`` leaves them alone) of ``scale`` and of
    ``offset = zero - 8 scale``, when :func:`expand_scales` gives back both float32 tensors bit
    for bit. That holds for GGUF Q4_0/Q4_1 (``scale = d``, ``zero = m + 8 d`` with ``d``, ``m``
    fp16: :func:`~llamakin.quant.gguf_blocks.q4_to_int4`); other scales stay float32 as given."""
    scales, zeros = scales.to(torch.float32), zeros.to(torch.float32)
    half_scales = scales.to(torch.float16)
    offsets = (zeros - 8 * scales).to(torch.float16)
    compact = half_scales.view(torch.int16), offsets.view(torch.int16)
    back_scales, back_zeros = expand_scales(*compact)
    if torch.equal(back_scales.view(torch.int32), scales.view(torch.int32)) and torch.equal(
        back_zeros.view(torch.int32), zeros.view(torch.int32)
    ):
        return compact
    return scales, zeros


def expand_scales(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`compact_scales`: float32 ``(scales, zeros)``."""
    if scales.dtype != torch.int16:
        return scales, zeros
    s = scales.view(torch.float16).to(torch.float32)
    return s, zeros.view(torch.float16).to(torch.float32) + 8 * s
