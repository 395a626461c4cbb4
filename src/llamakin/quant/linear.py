"""Quantized projection modules that stand in for :class:`~llamakin.model.linear.Linear`.

They are swapped into a built model by module replacement (:mod:`llamakin.quant.model`), so the
model code calls them like any projection: ``y = module(x)`` for ``x [..., in_features]``. The
weight is quantized; the bias stays in floating point and is added after the product, in the
activation's dtype. Inputs are cast to the kernel's activation dtype
(:func:`llamakin.quant.kernels.activation_dtype`) and outputs back to the input's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import LlamakinError
from ..speed import cpu_linear
from . import kernels, vnni
from .tensors import Int4Weight, Int8Weight, compact_scales, expand_scales, quantize_int8


class QuantizedLinear(nn.Module):
    """What the int8 and int4 modules share: sizes, float bias, the activation dtype."""

    kind = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        activation_dtype: torch.dtype,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_dtype = activation_dtype
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _float32_from_rows(self) -> int:
        """Rows from which :meth:`_float32_product` is faster than the kernel (CPU)."""
        raise NotImplementedError

    def _float32_product(
        self, rows: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``rows`` (float32) times the exact dequantized weight, plus ``bias``, in float32; None
        where this module has no such path."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.numel() // self.in_features >= self._float32_from_rows():
            # many rows: the float32 GEMM on the exact dequantized weight beats the kernel
            bias = None if self.bias is None else self.bias.float()
            y = self._float32_product(x.reshape(-1, self.in_features).float(), bias)
            if y is not None:
                return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        rows = x.reshape(-1, self.in_features).to(self.activation_dtype)
        y = self._product(rows).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    def quantized_weight(self):
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activations={str(self.activation_dtype).removeprefix('torch.')}"
        )


class Int8Linear(QuantizedLinear):
    """int8 weight-only, one scale per output channel (:class:`~llamakin.quant.tensors.Int8Weight`)."""

    kind = "int8"

    def __init__(
        self,
        weight: Int8Weight,
        bias: torch.Tensor | None = None,
        activation_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        device = torch.device(device) if device is not None else weight.qweight.device
        act = activation_dtype or kernels.activation_dtype(device, "int8")
        N, K = weight.shape
        super().__init__(K, N, None if bias is None else bias.to(device), act)
        self.register_buffer("qweight", weight.qweight.to(device).contiguous())
        self.register_buffer(
            "scales", weight.scales.to(device=device, dtype=torch.float32).contiguous()
        )
        self.register_buffer("kernel_scales", self.scales.to(act, copy=True), persistent=False)

    def _float32_from_rows(self) -> int:
        return kernels.INT8_DEQUANT_ROWS

    def _float32_product(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _int8_float32_product(rows, self.qweight, self.scales, bias)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        return kernels.int8_mm(rows, self.qweight, self.kernel_scales)

    def quantized_weight(self) -> Int8Weight:
        return Int8Weight(self.qweight, self.scales)


def _int8_float32_product(
    rows: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``rows`` (float32) times ``(qweight * scales[:, None]).T`` (``Int8Weight.dequantize``'s
    values) plus ``bias``, the weight widened slice by slice: no float32 copy of the whole matrix."""
    return cpu_linear.sliced_float32_linear(
        rows,
        qweight.shape[0],
        lambda start, stop: qweight[start:stop].to(torch.float32) * scales[start:stop, None],
        bias,
    )


class ExactInt8Linear(QuantizedLinear):
    """int8 per output channel, as :class:`Int8Linear`, multiplied by exact integer products on a
    CPU with VNNI (:mod:`llamakin.quant.vnni`; what ``load`` gives an int8 output head there). The
    weight is held only in fbgemm's packed form, whose padding depends on the CPU it packs for
    (SmolLM2's 28 MB head: 51 MB on one AVX-512 EPYC, 33.4 MB on a Zen 5; README, Quantization);
    files and ``dequantize`` unpack a copy. CPU only; a TorchScript trace cannot hold it
    (``traceable``), so traced decoding applies it eagerly."""

    kind = "int8"
    traceable = False

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None = None):
        N, K = weight.shape
        super().__init__(K, N, bias, torch.float32)
        self.register_buffer("scales", weight.scales.to(torch.float32).contiguous())
        self.packed = vnni.pack_in_pieces(weight)

    def _float32_from_rows(self) -> int:
        return kernels.INT8_DEQUANT_ROWS

    def _float32_product(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _int8_float32_product(rows, vnni.unpack(self.packed), self.scales.float(), bias)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        return vnni.exact_int8_mm(rows, self.packed)

    def quantized_weight(self) -> Int8Weight:
        return Int8Weight(vnni.unpack(self.packed), self.scales.float())

    def _apply(self, fn, recurse=True):
        if fn(torch.empty(0)).device.type != "cpu":
            raise LlamakinError(
                "this int8 head is packed for the CPU's integer kernels and cannot move to "
                "another device; load the model on the device it should run on."
            )
        return super()._apply(fn, recurse)


class Int4Linear(QuantizedLinear):
    """int4 weight-only in groups (:class:`~llamakin.quant.tensors.Int4Weight`), packed for the kernel.

    The module keeps the kernel's packed weight, the ``[K / group, N, 2]`` (scale, zero) table in
    the activation dtype (bfloat16 rounds the scales: measured in the README), and the float32
    scales and zeros as given (a quarter byte per weight at group 32; half that where fp16 holds
    them exactly, as from GGUF Q4_x: ``tensors.compact_scales``), which files store, so a
    quantized checkpoint reads back and writes out bit for bit whatever the activation dtype.
    """

    kind = "int4"

    def __init__(
        self,
        weight: Int4Weight,
        bias: torch.Tensor | None = None,
        activation_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        device = torch.device(device) if device is not None else weight.q.device
        act = activation_dtype or kernels.activation_dtype(device, "int4")
        N, K = weight.shape
        super().__init__(K, N, None if bias is None else bias.to(device), act)
        self.group_size = weight.group_size
        # float32 scales and zeros, as fp16 bits where that is exact (GGUF Q4_x): compact_scales
        compact = compact_scales(weight.scales.to(device), weight.zeros.to(device))
        self.register_buffer("stored_scales", compact[0].clone())
        self.register_buffer("stored_zeros", compact[1].clone())
        weight = _pad_rows(weight, kernels.INT4_ROW_MULTIPLE)
        self.register_buffer("packed", kernels.pack_int4(weight, device), persistent=False)
        self.register_buffer(
            "scale_zero", kernels.scale_and_zero(weight, act).to(device), persistent=False
        )

    @property
    def scales(self) -> torch.Tensor:
        return expand_scales(self.stored_scales, self.stored_zeros)[0]

    @property
    def zeros(self) -> torch.Tensor:
        return expand_scales(self.stored_scales, self.stored_zeros)[1]

    def _float32_from_rows(self) -> int:
        return kernels.INT4_DEQUANT_ROWS

    def _float32_product(
        self, rows: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        weight = self._unpacked_float32()  # None: a packing this build does not lay out as known
        return None if weight is None else cpu_linear.linear(rows, weight, bias)

    def _unpacked_float32(self) -> torch.Tensor | None:
        """``(q - 8) * s + z`` in float32, from the packed weight (no second copy is kept)."""
        q = kernels.unpack_int4_cpu(self.packed, self.packed.shape[0], self.in_features)
        if q is None:
            return None
        n, g = self.out_features, self.group_size
        q = q[:n].view(n, -1, g).float().sub_(8)
        scales, zeros = expand_scales(self.stored_scales, self.stored_zeros)
        return q.mul_(scales[..., None]).add_(zeros[..., None]).view(n, self.in_features)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        y = kernels.int4_mm(rows, self.packed, self.group_size, self.scale_zero)
        return y if y.shape[-1] == self.out_features else y[:, : self.out_features]

    @torch.no_grad()
    def quantized_weight(self) -> Int4Weight:
        """The values back from the packed layout: the kernel applied to the identity with float32
        scales gives ``(q - 8) * s + z`` per weight, from which ``q`` is recovered by rounding
        (exact: the error is far below half a step); groups with scale 0 get ``q = 0``."""
        K, g, n = self.in_features, self.group_size, self.out_features
        scales, zeros = expand_scales(self.stored_scales, self.stored_zeros)
        padded = _pad_rows(
            Int4Weight(
                torch.zeros(n, 1, dtype=torch.uint8, device=scales.device), scales, zeros, g
            ),
            kernels.INT4_ROW_MULTIPLE,
        )
        sz = kernels.scale_and_zero(padded, torch.float32)
        cols = []
        for start in range(0, K, 64):
            eye = torch.eye(K, dtype=torch.float32, device=self.packed.device)[start : start + 64]
            cols.append(kernels.int4_mm(eye, self.packed, g, sz).t()[:n])
        w = torch.cat(cols, dim=1).view(n, K // g, g)
        safe = torch.where(scales != 0, scales, torch.ones_like(scales))
        q = torch.round((w - zeros[..., None]) / safe[..., None] + 8)
        q = torch.where((scales != 0)[..., None], q, torch.zeros_like(q)).clamp_(0, 15)
        return Int4Weight(q.view(n, K).to(torch.uint8), scales, zeros, g)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def _pad_rows(w: Int4Weight, multiple: int) -> Int4Weight:
    """Rows of zero weight (scale and zero 0) up to a multiple of ``multiple`` (the packing's unit)."""
    extra = -w.q.shape[0] % multiple
    if not extra:
        return w
    pad = lambda t, value: torch.cat(
        (t, torch.full((extra, t.shape[1]), value, dtype=t.dtype, device=t.device))
    )
    return Int4Weight(pad(w.q, 0), pad(w.scales, 0.0), pad(w.zeros, 0.0), w.group_size)


class Int8Embedding(nn.Module):
    """Token embeddings as int8 with one scale per group of ``group_size`` features of each row
    (GGUF Q8_0's layout, group 32): a lookup dequantizes only the rows it reads."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.group_size = self.embedding_dim // scales.shape[1]
        self.dtype = dtype
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(torch.float32).contiguous())

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, group_size: int = 32) -> "Int8Embedding":
        V, D = weight.shape
        g = group_size if D % group_size == 0 else D
        w = weight.detach().to(torch.float32).view(V, D // g, g)
        scales = w.abs().amax(-1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(w / safe[..., None]).clamp_(-127, 127).to(torch.int8).view(V, D)
        return cls(q, scales, weight.dtype)

    def _groups(self, rows: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 values ``[..., groups, group_size]`` and float32 scales ``[..., groups]`` of
        the rows ``rows`` (ids or a slice); only those rows are read (a subclass may keep the
        table elsewhere: :class:`~llamakin.quant.gguf_embedding.MappedQ8Embedding`)."""
        q = self.qweight[rows]
        groups = self.embedding_dim // self.group_size
        return q.view(*q.shape[:-1], groups, self.group_size), self.scales[rows]

    def _rows(self, rows: torch.Tensor | slice) -> torch.Tensor:
        q, s = self._groups(rows)
        return (q.to(torch.float32) * s[..., None]).flatten(-2).to(self.dtype)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the table in float (all by default)."""
        return self._rows(slice(start, stop))

    @torch.no_grad()
    def to_int8_rows(self) -> Int8Weight:
        """The table requantized with one scale per row (a tied head's int8 matrix), slice by slice."""
        device = self._groups(slice(0, 0))[1].device
        q = torch.empty((self.num_embeddings, self.embedding_dim), dtype=torch.int8, device=device)
        scales = torch.empty(self.num_embeddings, dtype=torch.float32, device=device)
        drop_rows = self._row_page_dropper()
        for i in range(0, self.num_embeddings, 1024):  # filled in place: no list, no second copy
            part = quantize_int8(self.dequantize(i, i + 1024).float())
            q[i : i + 1024], scales[i : i + 1024] = part.qweight, part.scales
            if drop_rows is not None:
                drop_rows(i, i + 1024)
        return Int8Weight(q, scales)

    def _row_page_dropper(self) -> Callable[[int, int], None] | None:
        """For a table read from a mapped file (a subclass): a function dropping the pages of
        rows ``start:stop`` once a pass over the table has read them; None here (in memory)."""
        return None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows(ids)
