"""The matrix products of quantized weights: PyTorch's built-in kernels, chosen by device and CPU.

* int4 (group-wise, :class:`~llamakin.quant.tensors.Int4Weight`):
  CPU ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)`` with
  ``packed = _convert_weight_to_int4pack_for_cpu(q_int32 [N, K], 1)`` and
  ``scale_and_zero [K / group, N, 2]`` in the activation dtype; CUDA ("tinygemm")
  ``torch.ops.aten._weight_int4pack_mm(x_bf16, _convert_weight_to_int4pack(nibbles [N, K/2], 8),
  group_size, scale_and_zero_bf16)``. Both compute ``sum_k x[k] * ((q[n, k] - 8) * s + z)``.
* int8 (per output channel, :class:`~llamakin.quant.tensors.Int8Weight`): CPU
  ``torch.ops.aten._weight_int8pack_mm(x, q_int8 [N, K], scales [N])``, scales in the activation
  dtype; on CUDA ``(x @ q.to(x.dtype).T) * scales`` (torch has no CUDA int8 weight-only kernel;
  this is torchao's eager int8 weight-only formula).

Activation dtype: the kernels run in float32, bfloat16 or float16. On CPUs with bfloat16
instructions the bf16 path is the fast one (measured 3.0 ms int4 / 4.9 ms int8 for one
SmolLM2-135M token on an AVX-512-bf16 EPYC, against 100 / 43 ms in float32). On CPUs without
them, :data:`ACTIVATION_CHOICE` holds what ``benchmarks/bench_quant_kernels.py`` measured (see the
README's Quantization section). The choice changes speed and rounding only: every path computes
the same formula and is tested on every machine against the dequantized weights.

CUDA paths are written from PyTorch's documented operator signatures and torchao's usage; no
CUDA device was available when they were written, so they are untested.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .. import hardware
from .tensors import Int4Weight, Int8Weight


def activation_dtype(device: torch.device, kind: str) -> torch.dtype:
    """The dtype activations are cast to for a quantized product of ``kind`` (int4/int8) on ``device``."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and hardware.cpu_has_native(torch.bfloat16):
        return torch.bfloat16
    return ACTIVATION_CHOICE[kind]


# Without bf16 instructions: bfloat16 too. Measured on a 2-core AVX2 EPYC without avx512_bf16
# (benchmarks/bench_quant_kernels.py, 1 thread, SmolLM2-135M token, machine under load): int4
# 117 ms in bf16 vs 1677 ms in float32, int8 229 vs 979 ms (float32 F.linear: 367 ms). The
# kernels widen bf16 to float32 with shifts, which AVX2 has; their float32 paths are scalar.
ACTIVATION_CHOICE = {"int4": torch.bfloat16, "int8": torch.bfloat16}


# -- int4 --------------------------------------------------------------------------------------
INT4_ROW_MULTIPLE = 16  # the CPU packing needs N % 16 == 0 (CUDA tinygemm: 8); modules pad rows


def pack_int4(w: Int4Weight, device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernel layout of ``w.q`` for ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        nibbles = ((w.q[:, 0::2].to(torch.int32) << 4) | w.q[:, 1::2].to(torch.int32)).to(
            torch.uint8
        )
        return torch.ops.aten._convert_weight_to_int4pack(nibbles.to(device), 8)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 1)


# Many rows at once (a prefill, a perplexity window): the CPU int4 kernel is built for a few rows
# of activations; with many, unpacking the weight and running the float32 GEMM is faster (MKL),
# and exact to the dequantized weight. Rows from which that path is taken. Measured on a 2-core
# AVX2 EPYC (no AVX-512), one 1536x576 / 576x1536 matrix: the kernel takes 1.4-1.5 ms at 32 rows,
# 8-12 ms at 128; unpacking plus the float32 product 7.4 ms at 32 rows, 8-13 ms at 128; a whole
# 512-token prefill of SmolLM2-135M from its Q4_1 file runs 1.40x faster (README, Quantization).
INT4_DEQUANT_ROWS = int(os.environ.get("LLAMAKIN_INT4_DEQUANT_ROWS", "128"))
# The same for int8 (:class:`~llamakin.quant.linear.Int8Linear`), its weight widened to float32 in
# slices of ~4 MB (cpu_linear.sliced_float32_linear). Measured on a 2-core AVX-512 EPYC
# (2026-12-01), against ``_weight_int8pack_mm`` with bf16 activations: the 49,152 x 576 head 1.34x
# faster at 256 rows, 2.0x at 384-512; the layers' matrices 0.90-0.91x at 256, 0.97-1.05x at 384,
# 1.10-1.12x at 512; below 128 rows the kernel wins (0.3-0.9x). On the AVX2 EPYC a float32 prefill
# already ran 2.1-2.4x the int8 one.
INT8_DEQUANT_ROWS = int(os.environ.get("LLAMAKIN_INT8_DEQUANT_ROWS", "384"))
# The CPU packing (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel): blocks of
# B output rows, B = 32 on AVX2 and 64 on AVX-512; row k of a full block is B/2 bytes whose low
# nibbles hold rows 0..B/2-1 and high nibbles rows B/2..B-1 (a partial last block and builds
# without AVX2 pack neighbouring rows in pairs instead). Which B this build uses is checked once per
# shape against a probe, so the reshape below is only ever used where it is right.
_CPU_BLOCKS = (32, 64)


def unpack_int4_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """The ``[n, k]`` uint8 values (0..15) inside a CPU-packed int4 weight, by reshaping alone; None
    when this build of torch packs ``[n, k]`` some other way (checked once per shape against the
    packing of a probe matrix, so an unknown layout only loses the fast path, never exactness)."""
    block = _cpu_block(n, k)
    return None if block is None else _unblock(packed, n, k, block)


def _unblock(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    blocks = packed.view(n // block, k, block // 2)
    return torch.cat((blocks & 0xF, blocks >> 4), dim=-1).transpose(1, 2).reshape(n, k)


@functools.lru_cache(maxsize=None)
def _cpu_block(n: int, k: int) -> int | None:
    probe = torch.randint(
        0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(n * 7919 + k)
    )
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    if packed.dtype != torch.uint8 or packed.numel() * 2 != n * k:
        return None
    for block in _CPU_BLOCKS:
        if n % block == 0 and torch.equal(_unblock(packed, n, k, block).to(torch.int32), probe):
            return block
    return None


def scale_and_zero(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """``[K / group, N, 2]`` of (scale, zero), the kernels' second operand."""
    return torch.stack((w.scales.t(), w.zeros.t()), dim=-1).to(dtype).contiguous()


def int4_mm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_zero: torch.Tensor
) -> torch.Tensor:
    """``x [M, K]`` (in ``scale_zero``'s dtype) times the int4 weight: ``[M, N]``."""
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_zero)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zero)


# -- int8 --------------------------------------------------------------------------------------
def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` times ``(qweight * scales[:, None]).T``; ``scales`` in ``x``'s dtype."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int8pack_mm(x, qweight, scales)
    return torch.matmul(x, qweight.to(x.dtype).t()) * scales


# -- fbgemm int8 (the exact head, quant/vnni.py; dynamic activations: measured, not the default) ----
@functools.cache
def fbgemm_available() -> bool:
    return (
        "x86" in torch.backends.quantized.supported_engines
        or "fbgemm" in torch.backends.quantized.supported_engines
    )


def pack_fbgemm(w: Int8Weight, bias: torch.Tensor | None = None):
    """fbgemm's packed form of ``w`` (int8 per output channel, float32 scales), on the CPU."""
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # quantized tensor creation warns that it is deprecated
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(
            w.qweight.cpu(),
            w.scales.double().cpu(),
            torch.zeros(w.qweight.shape[0], dtype=torch.long),
            0,
        )
        return torch.ops.quantized.linear_prepack(qt, bias)


def fbgemm_linear(x: torch.Tensor, packed) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, packed, False)


# -- for the benchmark: int4 dequantized to float32 in slices, then a float32 product ----------
def int4_dequant_product(x: torch.Tensor, w: Int4Weight, rows: int = 512) -> torch.Tensor:
    return torch.cat(
        [
            x
            @ Int4Weight(
                w.q[i : i + rows], w.scales[i : i + rows], w.zeros[i : i + rows], w.group_size
            )
            .dequantize()
            .t()
            for i in range(0, w.q.shape[0], rows)
        ],
        dim=-1,
    )


def int4_product_fn(act: torch.dtype):
    """For the benchmark: a function ``(x, Int4Weight) -> x @ W.T`` through the int4 kernel in ``act``."""
    cache: dict[int, tuple] = {}

    def fn(x: torch.Tensor, w) -> torch.Tensor:
        key = id(w)
        if key not in cache:
            cache[key] = (pack_int4(w), scale_and_zero(w, act))
        packed, sz = cache[key]
        return int4_mm(x, packed, w.group_size, sz)

    return fn
