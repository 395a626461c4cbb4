"""GGUF reading and writing through llama.cpp's own ``gguf`` package.

Reading memory-maps the file; each tensor is dequantized to float32 on request (``gguf.quants``
handles F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants and more), one tensor at a time.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from .atomic import atomic_write
from .tensors import TensorSource

_MAGIC = b"GGUF"
# Metadata value types (gguf spec): fixed-size ones as struct formats; 8 = string, 9 = array.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads little-endian GGUF header values from a memory map, refusing to run past the end."""

    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CheckpointError(
                f"{self.path} ends inside its header; the file is truncated, so download it again."
            )
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _SCALARS:  # one vectorised read for numeric arrays
                dtype = np.dtype(_SCALARS[item_kind])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(item_kind) for _ in range(count)]
        raise CheckpointError(
            f"{self.path} has an unknown metadata value type {kind}; the file is corrupt."
        )


class GGUFFile(TensorSource):
    """Metadata and lazily dequantized tensors of one ``.gguf`` file.

    The header is parsed here (the ``gguf`` package's reader decodes every vocabulary entry into
    Python objects, which takes seconds for a 50k vocabulary); tensor data stays memory-mapped
    and is dequantized by ``gguf.quants`` one tensor at a time.
    """

    def __init__(self, path: str | Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        try:
            # copy-on-write: reads share the file's pages; a write into a tensor that is the
            # mapping (MappedQ8Embedding's table, say load_state_dict into it) gets a private
            # page instead of a segmentation fault, and the file is never changed
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        except FileNotFoundError:
            raise CheckpointError(
                f"{self.path} does not exist; give the path of a .gguf file."
            ) from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path} cannot be read ({e}).") from None
        cur = _Cursor(memoryview(self._map), self.path)
        if bytes(cur.take(4)) != _MAGIC if len(self._map) >= 4 else True:
            raise CheckpointError(
                f"{self.path} is not a GGUF file (wrong magic bytes); check the path."
            )
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise CheckpointError(
                f"{self.path} is GGUF version {version}; llamakin reads versions 2 and 3."
            )
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            kind, offset = cur.scalar("<I"), cur.scalar("<Q")
            infos.append((name, dims, kind, offset))
        alignment = self.metadata.get("general.alignment", 32)
        # the spec requires a power of two (llama.cpp refuses anything else); 0 would divide by zero
        if (
            isinstance(alignment, bool)
            or not isinstance(alignment, int)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise CheckpointError(
                f"{self.path} declares general.alignment={alignment!r}, which is not a power of two; "
                "the file is corrupt."
            )
        data_start = -(-cur.pos // alignment) * alignment
        self._tensors: dict[str, tuple[tuple[int, ...], Any, int, int]] = {}
        for name, dims, kind, offset in infos:
            if name in self._tensors:
                raise CheckpointError(
                    f"{self.path} declares tensor {name} twice; the file is corrupt."
                )
            try:
                qtype = GGMLQuantizationType(kind)
            except ValueError:
                raise CheckpointError(
                    f"{self.path}: tensor {name} has unknown ggml type {kind}; the file is corrupt "
                    "or newer than the gguf package."
                ) from None
            if qtype not in GGML_QUANT_SIZES:
                raise CheckpointError(
                    f"{self.path}: tensor {name} has ggml type {qtype.name}, which has no block "
                    "size; the file is corrupt."
                )
            block, type_size = GGML_QUANT_SIZES[qtype]
            shape = tuple(int(n) for n in reversed(dims))  # ggml lists dimensions fastest-first
            if block > 1 and shape and shape[-1] % block:
                raise CheckpointError(
                    f"{self.path}: tensor {name} has rows of {shape[-1]} values, not a multiple of "
                    f"the {block}-value blocks of {qtype.name}; the file is corrupt."
                )
            # Python integers: a hostile shape cannot wrap around
            nbytes = math.prod(shape) // block * type_size
            start = data_start + offset
            if start + nbytes > len(self._map):
                raise CheckpointError(
                    f"{self.path} ends inside tensor {name}; the file is truncated, so download it again."
                )
            self._tensors[name] = (shape, qtype, start, nbytes)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][0]

    def quant_type(self, name: str) -> str:
        return self._tensors[name][1].name

    def dtype(self, name: str) -> str:
        kind = self.quant_type(name)
        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(kind, kind)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, ``uint8 [rows, bytes per row]`` (for formats kept quantized)."""
        shape, _, start, nbytes = self._tensors[name]
        return np.asarray(self._map[start : start + nbytes]).reshape(
            shape[0] if len(shape) > 1 else 1, -1
        )

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a ``uint8 [rows, bytes per row]`` tensor that *is* the file's
        memory mapping (no copy; copy-on-write: a write changes this process's copy of a page,
        never the file). The tensor keeps the mapping alive after :meth:`close`; only the pages
        read through it become resident, and :meth:`release_pages` drops them again."""
        return torch.from_numpy(self.raw(name))

    def get(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        shape, qtype, start, nbytes = self._tensors[name]
        try:
            raw = np.asarray(self._map[start : start + nbytes]).reshape(
                math.prod(shape[:-1]) if len(shape) > 1 else 1, -1
            )
            values = dequantize(raw, qtype)
        except (ValueError, TypeError, IndexError) as e:
            raise CheckpointError(
                f"{self.path}: tensor {name} cannot be decoded ({e}); the file is corrupt."
            ) from None
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {name} uses quantization {qtype.name}, which the gguf package cannot "
                "dequantize; convert the file to a common type (F16, Q8_0, Q4_K, ...)."
            ) from None
        return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)

    def release_pages(self) -> None:
        """Drop the file's pages read so far from this process's resident set
        (``madvise(MADV_DONTNEED)``: they stay in the OS page cache and are read again if
        touched), so a loader going tensor by tensor holds one tensor's pages, not the whole
        file's (measured: up to the file's 98 MB of the default model's peak). For loaders only:
        on this copy-on-write mapping it would also drop pages written since (none are while
        loading)."""
        mapping = getattr(self._map, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._map = None


def write_gguf(
    path: Path,
    architecture: str,
    metadata: list[tuple[str, Any, str]],
    tensors: dict[str, torch.Tensor],
    quant_types: dict[str, str],
) -> None:
    """Write a GGUF file. ``metadata`` holds ``(key, value, kind)`` with kind one of
    ``str``, ``u32``, ``f32``, ``bool``, ``str_array``, ``i32_array``, ``f32_array``;
    ``quant_types`` maps tensor name to ``F32``, ``F16`` or ``Q8_0``; a failure leaves no file."""
    atomic_write(path, lambda tmp: _write_gguf(tmp, architecture, metadata, tensors, quant_types))


def _write_gguf(
    tmp: Path,
    architecture: str,
    metadata: list[tuple[str, Any, str]],
    tensors: dict[str, torch.Tensor],
    quant_types: dict[str, str],
) -> None:
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(tmp), architecture)
    adders = {
        "str": writer.add_string,
        "u32": writer.add_uint32,
        "f32": writer.add_float32,
        "bool": writer.add_bool,
        "str_array": writer.add_array,
        "i32_array": writer.add_array,
        "f32_array": writer.add_array,
    }
    for key, value, kind in metadata:
        adders[kind](key, value)
    for name, tensor in tensors.items():
        kind = gguf.GGMLQuantizationType[quant_types[name]]
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if kind == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float16)
        elif kind != gguf.GGMLQuantizationType.F32:
            data = quantize(data, kind)
        writer.add_tensor(name, data, raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
