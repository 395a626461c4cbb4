"""Faster CPU paths for the projection ``F.linear``: few-row decoding and half-precision weights.

These change how fast a product is computed, never what it computes; the model calls
:func:`linear` (through :class:`llamakin.model.linear.Linear`) and keeps the math.

On CPU, MKL computes ``x @ W.T`` for a handful of rows far below memory speed: decoding is a
stream over every weight once per step, and the layout of that stream decides the speed.
Measured on SmolLM2-135M's matrices (2 cores, float32, weights out of cache): for 2-16 rows,
``(W @ x.T).T`` is 2-3.5x faster than ``F.linear``; for one row, splitting ``W``'s rows in two
halves computed as one batched product (so both cores stream) matches a column-major copy of
``W`` without keeping one. Weights stay in the usual ``[out, in]`` layout; prefill, GPUs and
training of the weights themselves use ``F.linear`` unchanged (a weight that takes no gradient:
below). Results equal ``F.linear``'s up to float rounding order.

bfloat16/float16 weights on a CPU without instructions for them (see :mod:`llamakin.hardware`):
PyTorch emulates the product one row at a time, so its cost grows with every row (measured on
an AVX2 machine: 1.2 ms for 8 rows of a 1536x576 matrix, 82 ms for 512, 6x slower than float32).
For :data:`MIN_UPCAST_ROWS` rows or more, :func:`upcast_linear` instead widens the weight to
float32 in slices of about 4 MB, which stay in cache, and multiplies in float32: the same
products of the same half-precision values, accumulated in float32 and rounded once to the
input's dtype (0.61 ms and 14 ms for the examples above). The weights stay half-precision in
memory; one row (single-sequence decoding) keeps PyTorch's kernel, which is faster there.

float32 on an AVX-512 CPU: oneDNN's GEMM (``torch.ops.mkldnn._linear_pointwise``, what inductor
calls; the weight as it is, no packed copy) beats MKL's for every shape of SmolLM2-135M from
:data:`ONEDNN_MIN_ROWS` rows: measured 2026-12-01 on a 2-core AVX-512 EPYC, 1.06-1.38x for the
layers' matrices and 1.36-2.15x for the 49,152-row head at 17-256 rows, 1.05-1.29x at 512-2,048
rows, and 1.2-2x over ``W @ x.T`` at 8 and 16 rows; at 1-2 rows the decode forms above stay
ahead or level. On AVX2 (measured on an AVX2 EPYC: 0.91-0.97x on 576-wide matrices at 256-2,044
rows) MKL stays. The same float32 products, in another summation order. In training, a
weight that takes no gradient (LoRA's frozen base and head) goes to oneDNN both ways, the product
and the input's gradient (:class:`FrozenWeightProduct`): LoRA steps 1.08x -> 1.22x PEFT's speed
(``benchmarks/bench_lora.py``, same machine). Not inside a
TorchScript trace (it cannot record the op's ``Scalar?[]`` argument): a traced decode step of 8-16
rows keeps ``W @ x.T``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import hardware

MAX_DECODE_ROWS = 16
ONEDNN_MIN_ROWS = 8
MIN_UPCAST_ROWS = 4
UPCAST_SLICE_ELEMENTS = 1 << 20


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for inputs of at most :data:`MAX_DECODE_ROWS` rows on CPU."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    if rows.shape[0] == 1 and out_features % 2 == 0:
        halves = weight.view(2, out_features // 2, in_features).transpose(1, 2)
        y = torch.bmm(rows.expand(2, 1, in_features), halves).reshape(1, out_features)
    else:
        y = (weight @ rows.T).T.contiguous()
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_features)


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of half-precision tensors computed in float32, the weight widened slice by slice."""
    out_features, in_features = weight.shape
    y = sliced_float32_linear(x, out_features, lambda start, stop: weight[start:stop].float(), bias)
    return y.to(x.dtype)


def sliced_float32_linear(
    x: torch.Tensor,
    out_features: int,
    float32_rows: Callable[[int, int], torch.Tensor],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``F.linear`` in float32 of a weight that is only ever made float32 slice by slice:
    ``float32_rows(start, stop)`` gives its output rows ``start:stop`` (about
    :data:`UPCAST_SLICE_ELEMENTS` values each, which stay in cache); the result is float32."""
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features).float()
    step = max(1, UPCAST_SLICE_ELEMENTS // in_features)
    y = torch.cat(
        [
            linear(rows, float32_rows(start, min(start + step, out_features)))
            for start in range(0, out_features, step)
        ],
        dim=-1,
    )
    if bias is not None:
        y = y + bias.float()
    return y.view(*x.shape[:-1], out_features)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` by oneDNN's GEMM (float32, CPU, no autograd). ``weight`` may also be the
    transpose of a contiguous matrix (``W.t()``: ``x @ W``), which oneDNN reads as it is."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


@functools.cache
def _onednn_preferred() -> bool:
    return (
        hardware.has_avx512()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _onednn_fits(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """Whether :func:`onednn_linear` computes ``F.linear(x, weight)`` here, and faster."""
    return (
        rows >= ONEDNN_MIN_ROWS
        and x.dtype == weight.dtype == torch.float32
        and (weight.is_contiguous() or weight.t().is_contiguous())
        and _onednn_preferred()
        and not torch.jit.is_tracing()  # TorchScript cannot record its Scalar?[] argument
    )


class FrozenWeightProduct(torch.autograd.Function):
    """``x @ W.T + b`` for a weight and bias that take no gradient (a LoRA or QLoRA run's frozen
    base, a frozen head), by oneDNN both ways: the product and the input's gradient
    ``dy @ W`` (``W.t()`` as a view, no transposed copy). Measured 2026-12-01 on a 2-core AVX-512
    EPYC at 256 rows, against MKL's ``mm``: 1.09-1.19x forward and 1.15-1.21x for the gradient on
    SmolLM2-135M's layers, 1.27x / 1.17x on its 49,152-row head."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return onednn_linear(grad, weight.t(), None), None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through :func:`decode_linear` for few-row float32 inference on CPU,
    :func:`onednn_linear` for more rows on AVX-512 CPUs (in training too, for a weight that takes
    no gradient: :class:`FrozenWeightProduct`), and :func:`upcast_linear` for half-precision
    weights on CPUs without instructions for them. Under CPU autocast, ``F.linear`` as autocast
    runs it (the paths here would bypass it: the oneDNN op is not on autocast's lists)."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)  # autocast's product, in its dtype, whatever the path
    rows = x.numel() // x.shape[-1]
    frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
    if torch.is_grad_enabled() and (x.requires_grad or not frozen):
        if frozen and _onednn_fits(x, weight, rows):
            return FrozenWeightProduct.apply(x, weight, bias)
        return F.linear(x, weight, bias)
    if _onednn_fits(x, weight, rows):
        return onednn_linear(x, weight, bias)
    if weight.dtype == torch.float32 and weight.is_contiguous() and rows <= MAX_DECODE_ROWS:
        return decode_linear(x, weight, bias)
    if rows >= MIN_UPCAST_ROWS and hardware.emulated_half(weight):
        return upcast_linear(x, weight, bias)
    return F.linear(x, weight, bias)
