"""Normalisation layers (docs/variants.md §1.1, §6.1, §6.2, §10)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, normalising in float32 whatever the activation dtype.

    ``order`` picks where the weight multiply happens, the one rounding difference between
    implementations (docs/variants.md §1.1 vs §6.2):

    * ``cast_then_mul`` (HF Llama, Meta): ``weight * normalize(x.float()).to(x.dtype)``
    * ``mul_then_cast`` (ChatGLM2/3): ``(weight * normalize(x.float())).to(x.dtype)``

    With ``affine=False`` there is no weight (HF DiffLlama's per-head group norm, docs/variants.md §7.2).
    """

    def __init__(self, dim: int, eps: float, order: str = "cast_then_mul", affine: bool = True):
        super().__init__()
        self.eps = eps
        self.order = order
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self._scalars: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def float32_scalars(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` and ``eps`` as float32 0-dim tensors on ``device`` (kept, not buffers: a
        ``module.to(bfloat16)`` must not round eps). Inside a frozen TorchScript trace Python
        numbers become double constants that every call casts to float32 again (two extra
        kernels per norm); these stay float32 constants, the same arithmetic (bit-identical,
        tested), measured 1.7x faster per one-token norm in a trace on a 2-core AVX2 EPYC."""
        key = (n, self.eps, device)
        if self._scalars is None or self._scalars[0] != key:
            make = lambda value: torch.tensor(value, dtype=torch.float32, device=device)
            self._scalars = (key, make(float(n)), make(self.eps))
        return self._scalars[1], self._scalars[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if (
            torch.is_grad_enabled()
            and dtype == torch.float32
            and (self.weight is None or self.weight.dtype == torch.float32)
        ):
            # In float32 both orders are the same arithmetic, and torch's rms_norm is bit-identical
            # to the explicit form below; kept where autograd records (training, its backward).
            # Without autograd the explicit form is faster: on CPU, torch 2.13's rms_norm runs
            # those same operations plus wrappers and scalar casts (12 dispatches vs 7), 1.45x
            # slower per norm for one token and 1.8x for 512 inside a frozen TorchScript trace
            # (2-core AVX2 EPYC, README "Cutting the rest of the step").
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        n, eps = self.float32_scalars(xf.shape[-1], xf.device)
        # sum / n is how torch computes the mean (bit-identical); the in-place tail saves allocations
        xf = xf * xf.pow(2).sum(-1, keepdim=True).div_(n).add_(eps).rsqrt_()
        if self.weight is None:
            return xf.to(dtype)
        if self.order == "cast_then_mul":
            return self.weight * xf.to(dtype)
        return (self.weight * xf).to(dtype)


class LayerNorm(nn.LayerNorm):
    """Standard LayerNorm with weight and bias (ChatGLM-6B v1, docs/variants.md §6.1)."""


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The model-wide norm kind over ``dim`` features (default: hidden size)."""
    dim = config.hidden_size if dim is None else dim
    if config.norm_type == "layernorm":
        return LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps, config.rmsnorm_order)
