"""The LoRA layer: a frozen projection plus low-rank updates, one per logical projection.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds to a frozen ``W x`` the trainable
``(alpha / r) B A x``; PEFT's ``LoraLayer`` applies dropout to the adapter's input only and
initialises ``A`` Kaiming-uniform with ``a = sqrt(5)`` (``nn.Linear``'s default) and ``B`` to
zeros, so training starts from the base model exactly. :class:`LoraLinear` does the same.

llamakin fuses q/k/v into one matrix ``qkv`` (rows ``[q | k | v]``) and gate/up into
``gate_up``. A LoRA on the fused matrix would be a different (coupled) parametrisation from
the separate ``q_proj``/``k_proj``/``v_proj`` adapters everyone else trains, so each *part* of
a fused matrix gets its own ``A`` and ``B``: the adapter maps one-to-one onto Hugging Face
module names and round-trips through PEFT's format. The base product stays one fused matmul;
the ``A`` matrices of the parts share one matmul too (they read the same input), and when every
part is adapted their ``B`` matrices form one block-diagonal product added into the output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UnsupportedError
from ..model.linear import Linear, linear


class LoraLinear(Linear):
    """A :class:`~llamakin.model.linear.Linear` whose frozen weight gets low-rank updates.

    ``parts`` lists the logical projections stacked in the weight's rows, as ``(name, rows)``
    in row order (``(("q", 576), ("k", 192), ("v", 192))`` for a fused qkv). ``ranks`` and
    ``scales`` (``alpha / r``) cover the adapted parts only; the others keep the base rows.
    The layer shares the base layer's ``weight`` and ``bias`` parameters (same names in the
    state dict, no copy) and adds ``lora_A.<part>`` ``[r, in]`` and ``lora_B.<part>`` ``[rows, r]``.
    A QLoRA base (:class:`~llamakin.lora.quantized.FrozenQuantizedLinear`) is kept as the submodule
    ``quantized`` instead, which computes the frozen product; the adapters are then float32.
    """

    def __init__(
        self,
        base: Linear,
        parts: tuple[tuple[str, int], ...],
        ranks: dict[str, int],
        scales: dict[str, float],
        dropout: float = 0.0,
    ):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, Linear):
            self.quantized = None
            self.weight, self.bias = base.weight, base.bias
            kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        else:  # QLoRA: a frozen quantized base (lora.quantized) computes the product, its bias included
            self.quantized = base
            self.weight = self.bias = None
            kw = dict(device=base.scales.device, dtype=torch.float32)
        if sum(rows for _, rows in parts) != self.out_features:
            raise ValueError(f"parts {parts} do not cover the {self.out_features} output rows")
        self.parts = tuple(parts)
        self.adapted = tuple(name for name, _ in parts if name in ranks)
        self.scales = {name: float(scales[name]) for name in self.adapted}
        offsets, start = {}, 0
        for name, rows in parts:
            offsets[name] = (start, rows)
            start += rows
        self.offsets = offsets
        self.lora_A = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(ranks[n], self.in_features, **kw)) for n in self.adapted}
        )
        self.lora_B = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(offsets[n][1], ranks[n], **kw)) for n in self.adapted}
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """PEFT's default initialisation: ``A`` Kaiming-uniform (``a = sqrt(5)``), ``B`` zeros."""
        for name in self.adapted:
            nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name])

    def extra_repr(self) -> str:
        ranks = ", ".join(
            f"{n}: r={self.lora_A[n].shape[0]}, scale={self.scales[n]:g}" for n in self.adapted
        )
        return f"in_features={self.in_features}, out_features={self.out_features}, lora=({ranks})"

    def delta(self, name: str) -> torch.Tensor:
        """The update ``scale * B @ A`` of one part's rows, in float32 (for merging)."""
        return self.scales[name] * (self.lora_B[name].float() @ self.lora_A[name].float())

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.quantized is not None:
            y = self.quantized(x, bias)
        else:
            y = linear(x, self.weight, self.bias if bias is None else bias)
        if not self.adapted:
            return y
        h = self.dropout(x)
        a = [self.lora_A[n] for n in self.adapted]
        z = linear(h, a[0] if len(a) == 1 else torch.cat(a))  # every part's A x in one product
        if len(self.adapted) == len(self.parts):
            # every part adapted: the parts' scaled B side by side on the diagonal of one
            # [out, sum r] matrix, so all updates are one product added into y (addmm) instead of
            # a product per part, a concatenation and an add; the zero blocks add exact zeros
            b = [self.scales[n] * self.lora_B[n] for n in self.adapted]
            b = b[0] if len(b) == 1 else torch.block_diag(*b)
            return torch.addmm(y.flatten(0, -2), z.flatten(0, -2), b.t()).view(y.shape)
        zs = z.split([t.shape[0] for t in a], dim=-1)
        for name, zp in zip(self.adapted, zs):
            start, rows = self.offsets[name]
            # the base product's output is not saved for backward
            y[..., start : start + rows] += linear(zp * self.scales[name], self.lora_B[name])
        return y

    def base_layer(self) -> Linear:
        """A plain layer with the same (possibly merged) weight and bias, no adapter."""
        if self.quantized is not None:
            return self.quantized
        plain = Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    @torch.no_grad()
    def merge_(self) -> Linear:
        """Add every update into the weight (in float32, rounded once) and return the plain layer."""
        if self.quantized is not None:
            raise UnsupportedError(
                "this LoRA layer's base is quantized (QLoRA), so the adapter cannot be folded into "
                "it; merge into the float base instead: llamakin.load(BASE, adapter=ADAPTER_DIR)."
            )
        for name in self.adapted:
            start, rows = self.offsets[name]
            rows_view = self.weight[start : start + rows]
            rows_view.copy_((rows_view.float() + self.delta(name)).to(self.weight.dtype))
        return self.base_layer()


def is_lora(module: nn.Module) -> bool:
    return isinstance(module, LoraLinear)


def lora_only(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of a model (``...lora_A.q`` / ``...lora_B.q`` names), nothing else."""
    return {n: p for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n}


__all__ = ["LoraLinear", "is_lora", "lora_only"]
