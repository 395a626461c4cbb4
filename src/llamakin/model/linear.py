"""The projection layer, with a faster CPU path for the few-row products of decoding.

On CPU, MKL computes ``x @ W.T`` for a handful of rows far below memory speed: decoding is a
stream over every weight once per step, and the layout of that stream decides the speed.
Measured on SmolLM2-135M's matrices (2 cores, float32, weights out of cache): for 2-16 rows,
``(W @ x.T).T`` is 2-3.5x faster than ``F.linear``; for one row, splitting ``W``'s rows in two
halves computed as one batched product (so both cores stream) matches a column-major copy of
``W`` without keeping one. Weights stay in the usual ``[out, in]`` layout; training, prefill
and GPUs use ``F.linear`` unchanged. Results equal ``F.linear``'s up to float rounding order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_DECODE_ROWS = 16


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through :func:`decode_linear` for few-row float32 inference on CPU."""
    if (x.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
            and x.numel() <= MAX_DECODE_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
        return decode_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
