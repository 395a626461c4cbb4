"""QLoRA's frozen base: projections held as int4 (in groups) or int8 (per channel) weight-only.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) trains float LoRA adapters on a base whose
weights are stored quantized and dequantized for each product; gradients flow through the
frozen quantized products into the adapters (the base's own weights get none). The weights here
are :mod:`llamakin.quant`'s layouts (:class:`~llamakin.quant.tensors.Int4Weight`, nibbles packed
two per byte with :func:`~llamakin.quant.tensors.pack_nibbles`, float32 scales and zeros;
:class:`~llamakin.quant.tensors.Int8Weight`), made by the same quantizers as
``llamakin.load(..., quantize=)``: the output head int8 (a tied head gets its own int8 copy),
the embedding int8 in groups of 32 (:class:`~llamakin.quant.linear.Int8Embedding`).

Why not :class:`~llamakin.quant.linear.Int4Linear`/``Int8Linear`` themselves: their kernels
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) have no derivative in PyTorch, their
packed int4 layout cannot be read back cheaply for one, and at training's row counts they are
slower than widening the weight: measured on this 2-core AVX2 EPYC (load ~5) for 2,048 rows of a
1536x576 matrix, the int4 kernel (bf16 activations) 614 ms, the int8 kernel 596 ms, dequantizing
the int4 nibbles to float32 and ``F.linear`` 332 ms (the float32 product alone: 369 ms). So
:class:`QuantizedProduct` widens the weight slice by slice (at most :data:`SLICE_ELEMENTS` at a
time, so a large head never exists whole in float) in the activation's dtype — float32 here,
bfloat16 under autocast where the machine has it — both for the product and for the input's
gradient ``grad_y @ W``. Only the quantized values stay resident.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..quant.gguf_blocks import BLOCK
from ..quant.linear import Int8Embedding
from ..quant.model import HEAD, _bias_for, projection_names
from ..quant.tensors import (
    GROUP_SIZES,
    Int4Weight,
    Int8Weight,
    check_group_size,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)

MODES = ("int4", "int8")
SLICE_ELEMENTS = 1 << 22  # weight elements widened at once (16 MB in float32)


class FrozenQuantizedLinear(nn.Module):
    """A frozen projection stored as int4/int8 weight-only; ``y = x W^T + b`` with ``W`` dequantized
    slice by slice for each product. Gradients reach the input (and so the adapters upstream)."""

    def __init__(self, weight: Int4Weight | Int8Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # not persistent: a run's checkpoints hold the adapters only; the base is rebuilt from init_from
        if isinstance(weight, Int4Weight):
            self.kind, self.group_size = "int4", weight.group_size
            self.register_buffer("nibbles", pack_nibbles(weight.q), persistent=False)
            self.register_buffer(
                "scales", weight.scales.to(torch.float32).contiguous(), persistent=False
            )
            self.register_buffer(
                "zeros", weight.zeros.to(torch.float32).contiguous(), persistent=False
            )
        else:
            self.kind, self.group_size = "int8", None
            self.register_buffer("qweight", weight.qweight.contiguous(), persistent=False)
            self.register_buffer(
                "scales", weight.scales.to(torch.float32).contiguous(), persistent=False
            )
        self.register_buffer(
            "bias", None if bias is None else bias.detach().clone(), persistent=False
        )

    def dequantize(
        self, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the weight in ``dtype``."""
        if self.kind == "int4":
            w = Int4Weight(
                unpack_nibbles(self.nibbles[start:stop]),
                self.scales[start:stop],
                self.zeros[start:stop],
                self.group_size,
            )
        else:
            w = Int8Weight(self.qweight[start:stop], self.scales[start:stop])
        return w.dequantize(dtype)

    def slices(self) -> list[tuple[int, int]]:
        step = max(1, SLICE_ELEMENTS // self.in_features)
        return [(s, min(s + step, self.out_features)) for s in range(0, self.out_features, step)]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = QuantizedProduct.apply(
            x.reshape(-1, self.in_features), self, self.bias if bias is None else bias
        )
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.kind}{group}"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class QuantizedProduct(torch.autograd.Function):
    """``x W^T + b`` of a :class:`FrozenQuantizedLinear`, with ``dL/dx = dL/dy W`` in backward (the
    weight and bias are frozen: no gradient for them)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, module: FrozenQuantizedLinear, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``x [M, in_features]`` -> ``[M, out_features]``."""
        dtype = _compute_dtype(x)
        rows = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            parts = [F.linear(rows, module.dequantize(a, b, dtype)) for a, b in module.slices()]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            if bias is not None:
                y = y + bias.to(dtype)
        ctx.module, ctx.input_dtype = module, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        module = ctx.module
        g = grad
        with torch.autocast(g.device.type, enabled=False):
            grad_x = None
            for a, b in module.slices():
                part = g[:, a:b] @ module.dequantize(a, b, g.dtype)
                grad_x = part if grad_x is None else grad_x + part
        return grad_x.to(ctx.input_dtype), None, None


def check_mode(mode: str | None, group_size: int) -> str | None:
    """``lora.quantize`` and ``lora.group_size``, refused in one sentence when wrong."""
    if mode in (None, "none", False):
        return None
    if mode not in MODES:
        raise ConfigError(f"lora.quantize must be int4, int8 or none, got {mode!r}.")
    if group_size not in GROUP_SIZES:
        raise ConfigError(
            f"lora.group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}."
        )
    return mode


@torch.no_grad()
def quantize_base(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Turn a float model's projections into frozen int4/int8 ones in place (the head int8, a tied
    head its own int8 copy; the embedding int8 in groups of 32), as ``llamakin.load(quantize=)`` does."""
    for name in projection_names(model):
        linear = model.get_submodule(name)
        if name != HEAD and mode == "int4":
            check_group_size(group_size, linear.in_features, f" ({name})")
        bias = _bias_for(model, name, linear.bias)
        weight = (
            quantize_int8(linear.weight)
            if name == HEAD or mode == "int8"
            else quantize_int4(linear.weight, group_size)
        )
        model.set_submodule(name, FrozenQuantizedLinear(weight, bias))
    if model.lm_head is None:
        model.lm_head = FrozenQuantizedLinear(quantize_int8(model.embed.weight))
    if isinstance(model.embed, nn.Embedding):
        model.embed = Int8Embedding.from_float(model.embed.weight, BLOCK)
    return _frozen_embedding(model)


def _frozen_embedding(model: nn.Module) -> nn.Module:
    """The int8 embedding's tables as non-persistent buffers too (checkpoints hold adapters only)."""
    if isinstance(model.embed, Int8Embedding):
        for name, buf in list(model.embed.named_buffers(recurse=False)):
            model.embed.register_buffer(name, buf, persistent=False)
    return model


def load_quantized_base(
    path, mode: str, group_size: int = 32, device: torch.device | str = "cpu"
) -> nn.Module:
    """``path`` (anything :func:`llamakin.load` reads) with a frozen quantized base, read straight into
    the quantized layouts (no whole float copy of the model; a llamakin-quantized checkpoint is
    dequantized and quantized again in ``mode``)."""
    from ..quant.files import is_quantized_checkpoint, load_quantized_checkpoint
    from ..quant.model import load_quantized
    from ..resident import release_freed_memory
    from ..source import resolve_model

    source = resolve_model(path)
    if not source.is_gguf and is_quantized_checkpoint(source.path):
        float_model = load_quantized_checkpoint(source.path, torch.float32, device, dequantize=True)
        return quantize_base(float_model, mode, group_size)
    weights: dict[str, Int4Weight | Int8Weight] = {}
    model = load_quantized(
        source.path, torch.float32, device, mode, group_size, head="int8", collect=weights
    )
    for name, weight in weights.items():
        old = model.get_submodule(name)
        model.set_submodule(name, FrozenQuantizedLinear(weight, old.bias))
    del weights
    # float tensors read zero-copy from a mapped safetensors file keep all of it resident
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                param.data = param.data.clone()
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.clone()
    release_freed_memory()  # the kernels' packed copies and the file's pages (measured: 1,016 -> 503 MB RSS)
    return _frozen_embedding(model)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (what the frozen base costs in memory)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


__all__ = [
    "FrozenQuantizedLinear",
    "MODES",
    "QuantizedProduct",
    "check_mode",
    "load_quantized_base",
    "quantize_base",
    "quantized_bytes",
]
