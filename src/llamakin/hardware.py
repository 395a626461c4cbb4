"""What this machine's CPU computes natively, for the choices that depend on it.

Half-precision matrix products run at full speed only on CPUs with instructions for them
(``avx512_bf16``/``amx_bf16`` for bfloat16, ``avx512_fp16``/``amx_fp16`` for float16 on x86;
``bf16``/``fphp`` on aarch64). Elsewhere PyTorch emulates them, measured 5-6x slower than float32
on an AVX2 machine. The answer only steers speed choices (bf16 autocast in training, upcasting
half-precision weights for matrix products), never results beyond rounding.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
_NATIVE_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16", "fphp"),
}


@functools.cache
def _cpu_model() -> str:
    """The CPU's name, with its family and model numbers when the name alone is ambiguous: a
    virtual machine's "AMD EPYC" may be a Zen 4 (family 25) or a Zen 5 (family 26), whose
    AVX-512 units differ in width, and measured ratios differ with them (README, Performance)."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
        name = fields.get("model name")
        if name:
            if "cpu family" in fields and "model" in fields:
                name += f" (family {fields['cpu family']}, model {fields['model']})"
            return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_cpu() -> str:
    """What every benchmark prints beside its numbers: the CPU model, the flags that decide the
    speed paths (AVX2, AVX-512, native bf16), the cores, torch's threads and the load average."""
    wanted = [
        f
        for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
        if f in _cpu_flags()
    ]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{_cpu_model()}; flags: {' '.join(wanted) or 'none of avx2/avx512'}; {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads; load average {load}"
    )


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for matrix products in ``dtype`` (float32: always)."""
    if dtype == torch.float32:
        return True
    return any(flag in _cpu_flags() for flag in _NATIVE_FLAGS.get(dtype, ()))


def emulated_half(t: torch.Tensor) -> bool:
    """Whether ``t`` is a half-precision CPU tensor whose products this CPU can only emulate."""
    return t.device.type == "cpu" and t.dtype in HALF_DTYPES and not cpu_has_native(t.dtype)


def has_vnni() -> bool:
    """Whether this CPU has VNNI's int8 dot products (``avx512_vnni`` or ``avx_vnni``): exact
    integer products without int16 saturation (:mod:`llamakin.quant.vnni`)."""
    return bool({"avx512_vnni", "avx_vnni"} & _cpu_flags())


def has_avx512() -> bool:
    """Whether this CPU has AVX-512 (``avx512f``): oneDNN's float32 GEMM then beats MKL's on
    llamakin's shapes (:mod:`llamakin.speed.cpu_linear`)."""
    return "avx512f" in _cpu_flags()
