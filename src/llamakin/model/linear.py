"""The projection layer of the model: ``nn.Linear`` whose product goes through the CPU speed paths
of :mod:`llamakin.speed.cpu_linear` (equal to ``F.linear`` up to float rounding order)."""

from __future__ import annotations

import torch
from torch import nn

from ..speed.cpu_linear import linear

__all__ = ["Linear", "linear"]


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear`; ``bias`` replaces the layer's own for one call
    (attention's masked partial q/k/v bias), so subclasses such as LoRA layers see every call."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias if bias is None else bias)
