"""Feed-forward blocks (docs/variants.md §1, §3.1, §6.1, §6.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .linear import Linear


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused in one matrix, gate rows first.

    The fused layout is ChatGLM2's ``dense_h_to_4h`` and HF GLM's ``gate_up_proj`` (docs/variants.md §6.2, §6.3);
    checkpoints with separate ``gate_proj``/``up_proj`` are concatenated on load and split on
    export by the family adapters. One matmul instead of two halves the dispatches per token.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_up = Linear(d, 2 * i, bias=config.mlp_bias)
        self.down = Linear(i, d, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """``down(gelu_tanh(up(x)))`` (ChatGLM-6B v1's ``dense_h_to_4h``/``dense_4h_to_h``, docs/variants.md §6.1)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.up = Linear(d, i, bias=config.mlp_bias)
        self.down = Linear(i, d, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def make_mlp(config: ModelConfig) -> nn.Module:
    return GeluMLP(config) if config.mlp_type == "gelu_tanh" else SwiGLU(config)
