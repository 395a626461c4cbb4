"""The int8 output head by exact integer products on CPUs with VNNI (README, Quantization).

PyTorch's int8 weight-only CPU kernel (``_weight_int8pack_mm``) widens every weight to the
activation's dtype, bfloat16, and multiplies in floating point: on SmolLM2-135M's 49,152 x 576
tied head that is a quarter of a decode step, and the bf16 rounding of the activations moves the
logits by ~0.02 on average. fbgemm's quantized linear (PyTorch's ``x86`` quantized engine,
``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``) multiplies uint8 activations by the
same int8 weights with int32 accumulation, VNNI's ``vpdpbusd``: exact integer dot products, scaled
once in float32. One pass of 8-bit activations is too coarse for the final hidden state, so
:func:`exact_int8_mm` splits it in two, ``x = x1 + x2 + e``: ``x1`` is ``x`` on a grid of
``2^k / 128`` (``2^k`` the power of two just above ``max |x|``), ``x2`` the remainder on its own
such grid, ``|e|`` at most half of ``x2``'s step (~``max |x| / 2^15``). Both passes are exact
products, and the grid steps are powers of two, so ``x1``, ``x2`` and the remainder are computed
without rounding and the kernel's own quantization of ``x1``/``x2`` reproduces them exactly.

Measured 2026-12-01 on a 2-core AVX-512 EPYC with ``avx512_vnni``, the default model's head on
1,024 positions of Shakespeare against the head in float64 from the same int8 values: mean
|logit error| 1.6e-3 with two passes (bf16 kernel: 2.3e-2), argmax agreement 100% (97.2%),
perplexity 28.5483 (float64: 28.5472; bf16 kernel 28.5720). Speed: README, Quantization.

Without VNNI the x86 kernels pair products in int16 (``vpmaddubsw``), which saturates for large
activations; :func:`exact_int8_available` therefore checks the flag and, once per process, that
a product of extreme values comes out exact. The packed weight is an fbgemm object, not a
tensor: a TorchScript trace cannot take it as an input or a constant, so a traced decode step
stops before such a head and :class:`~llamakin.speed.decode_trace.Decoder` applies it eagerly.
"""

from __future__ import annotations

import functools
import os

import torch

from .. import hardware
from .kernels import pack_fbgemm
from .tensors import Int8Weight

GRID = 128  # activation values per power of two: round(x / 2^k * 128) in [-128, 127]
PASSES = 2
ZERO_POINT = 128  # uint8 activations centred on zero


PACK_ROWS = 8192  # rows of the weight per packed piece (pack_in_pieces)


def pack_in_pieces(weight: Int8Weight, rows: int = PACK_ROWS) -> list:
    """fbgemm's packed form of ``weight``, ``rows`` output rows per piece. Packing first copies
    its input into a quantized tensor, so packing SmolLM2-135M's 28 MB head whole held the int8
    matrix, that copy and the 33 MB packed result at once (the whole default-model process
    peaked there, at 408 MiB on a Zen 5 EPYC); in pieces the copy is one piece's (README,
    Quantization). Each piece is its own fbgemm call in :func:`exact_int8_mm`."""
    return [
        pack_fbgemm(Int8Weight(weight.qweight[i : i + rows], weight.scales[i : i + rows]))
        for i in range(0, weight.qweight.shape[0], rows)
    ]


def _pieces(packed) -> list:
    return packed if isinstance(packed, (list, tuple)) else [packed]


def unpack(packed) -> torch.Tensor:
    """The int8 values ``[N, K]`` of a weight packed by :func:`~llamakin.quant.kernels.pack_fbgemm`
    or :func:`pack_in_pieces` (a copy)."""
    return torch.cat(
        [torch.ops.quantized.linear_unpack(piece)[0].int_repr() for piece in _pieces(packed)]
    )


def exact_int8_mm(x: torch.Tensor, packed, passes: int = PASSES) -> torch.Tensor:
    """``x [M, K]`` (float32) times the packed int8 weight's dequantized transpose (one packed
    object or :func:`pack_in_pieces`'s list), in float32:
    ``x`` split into ``passes`` parts on power-of-two grids (module docstring), all multiplied in
    one call (the parts as ``passes * M`` rows, each normalised to the grid ``[-1, 1)``), so the
    weight is read once: a decode step's head is memory-bound."""
    step = 1.0 / GRID
    parts, tops, rest = [], [], x
    for _ in range(passes):
        _, exponent = torch.frexp(rest.abs().amax())
        top = torch.ldexp(torch.ones((), dtype=x.dtype), exponent)  # 2^k > max |rest|
        part = torch.clamp(torch.round(rest / top * GRID), -GRID, GRID - 1) * step  # exact
        rest = rest - part * top  # exact: part * top is on rest's own grid
        parts.append(part)
        tops.append(top)
    rows = torch.cat(parts)
    y = [
        torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            rows, step, ZERO_POINT, piece
        )
        for piece in _pieces(packed)
    ]
    y = y[0] if len(y) == 1 else torch.cat(y, dim=1)
    out = None
    for p, top in enumerate(tops):
        term = y[p * x.shape[0] : (p + 1) * x.shape[0]] * top
        out = term if out is None else out + term
    return out


@functools.cache
def exact_int8_available() -> bool:
    """Whether :func:`exact_int8_mm` is exact here: a CPU with VNNI (``avx512_vnni`` or
    ``avx_vnni``), fbgemm's ops in this torch build, and a probe product of extreme values
    (activations at the ends of the grid, weights at +-127, where int16 pairing would saturate)
    equal to the float64 product. ``LLAMAKIN_EXACT_INT8_HEAD=0`` turns it off."""
    if os.environ.get("LLAMAKIN_EXACT_INT8_HEAD", "1") == "0":
        return False
    if not hardware.has_vnni():
        return False
    if not hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"):
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (64, 256), dtype=torch.int8, generator=generator)
        q[:8] = 127
        q[8:16] = -127
        scales = torch.rand(64, generator=generator) / 64 + 1 / 256
        packed = pack_fbgemm(Int8Weight(q, scales))
        weight = q.double() * scales.double()[:, None]
        for value in (127 / GRID, -127 / GRID):  # every activation at an end of its grid
            x = torch.full((1, 256), value)
            got = exact_int8_mm(x, packed, passes=1).double()
            if not torch.allclose(got, x.double() @ weight.T, rtol=1e-6, atol=1e-6):
                return False
        return True
    except RuntimeError:
        return False
