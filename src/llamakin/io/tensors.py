"""Lazy tensor sources over checkpoint files, and the safetensors writer.

A :class:`TensorSource` lists tensor names and shapes from file headers alone and reads one
tensor at a time, so loading never holds a second full copy of the model in memory. Readers
never unpickle arbitrary objects: safetensors has no code in it, and ``pytorch_model.bin`` is
opened with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .atomic import atomic_write


class TensorSource:
    """Read-only access to named tensors."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def dtype(self, name: str) -> str:
        """The stored dtype's name (``float32``, ``bfloat16``, ...), read from headers where possible."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _corrupt(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable checkpoint file ({detail}); it may be truncated or corrupt, so "
        "download or copy it again."
    )


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index} is not a valid shard index ({e}); restore it from the original checkpoint."
        ) from None
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        raise CheckpointError(
            f"{index} lists shard files that are missing: {', '.join(missing)}; copy the complete checkpoint."
        )
    return weight_map


class SafetensorsSource(TensorSource):
    """One ``.safetensors`` file or a sharded set described by ``*.safetensors.index.json``."""

    def __init__(self, files: list[Path]):
        self._handles = {}
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise _corrupt(
                    f, str(e).replace("Error while deserializing header: ", "")
                ) from None
            self._handles[f] = handle
            for name in handle.keys():
                self._where[name] = f

    @classmethod
    def from_index(cls, index: Path) -> "SafetensorsSource":
        weight_map = _read_index(index)
        source = cls(sorted({index.parent / f for f in weight_map.values()}))
        absent = sorted(n for n, f in weight_map.items() if n not in source._where)
        if absent:
            raise CheckpointError(
                f"{index} lists tensors that its shards do not contain (e.g. {absent[0]}); "
                "the checkpoint is incomplete."
            )
        return source

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    _SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

    def dtype(self, name: str) -> str:
        code = self._handles[self._where[name]].get_slice(name).get_dtype()
        return self._SAFETENSORS_DTYPES.get(code, code.lower())

    def get(self, name: str) -> torch.Tensor:
        f = self._where[name]
        try:
            return self._handles[f].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise _corrupt(f, f"tensor {name}: {e}") from None


class TorchBinSource(TensorSource):
    """``pytorch_model.bin`` (or shards) loaded with ``weights_only=True`` and memory-mapped when possible."""

    def __init__(self, files: list[Path]):
        self._tensors: dict[str, torch.Tensor] = {}
        for f in files:
            state = self._load(f)
            if not isinstance(state, dict) or not all(
                isinstance(v, torch.Tensor) for v in state.values()
            ):
                raise CheckpointError(
                    f"{f} does not hold a flat dict of tensors; it is not a model state dict."
                )
            self._tensors.update(state)

    @staticmethod
    def _load(f: Path):
        try:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise _corrupt(f, str(e).splitlines()[0]) from None
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad pickle
            raise _corrupt(
                f, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise _corrupt(
                f, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None

    @classmethod
    def from_index(cls, index: Path) -> "TorchBinSource":
        return cls(sorted({index.parent / f for f in _read_index(index).values()}))

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def dtype(self, name: str) -> str:
        return str(self._tensors[name].dtype).removeprefix("torch.")


def open_weights(directory: Path) -> TensorSource:
    """The weights of a Hugging Face-style directory: safetensors (single or sharded) first,
    then ``pytorch_model.bin`` (single or sharded)."""
    for index_name, single, cls in (
        ("model.safetensors.index.json", "model.safetensors", SafetensorsSource),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", TorchBinSource),
    ):
        if (directory / index_name).is_file():
            return cls.from_index(directory / index_name)
        if (directory / single).is_file():
            return cls([directory / single])
    if (directory / "consolidated.safetensors").is_file():  # Mistral's native format
        return SafetensorsSource([directory / "consolidated.safetensors"])
    meta_shards = sorted(directory.glob("consolidated.*.pth"))
    if len(meta_shards) > 1:
        raise CheckpointError(
            f"{directory} holds {len(meta_shards)} model-parallel shards (consolidated.*.pth); llamakin reads "
            "single-file Meta checkpoints, so merge the shards first."
        )
    if meta_shards:
        return TorchBinSource(meta_shards)
    loose = sorted(directory.glob("*.safetensors"))
    if loose:
        return SafetensorsSource(loose)
    raise CheckpointError(
        f"{directory} has no model.safetensors, sharded safetensors index, pytorch_model.bin or "
        "consolidated.00.pth; point llamakin at a directory that holds the weights."
    )


def shard_plan(
    tensors: dict[str, torch.Tensor], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_safetensors(
    tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 5 * 1024**3
) -> list[Path]:
    """Write ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` plus the HF index)
    atomically: each file is written under a temporary name and renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = shard_plan(tensors, max_shard_bytes)
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    written = []
    for shard, name in zip(shards, names):
        # One shard at a time is copied to fresh CPU storage (safetensors refuses views that share
        # memory, as split rows of one fused matrix do): export never holds a second full copy.
        materialised = {
            k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in shard.items()
        }
        atomic_write(
            directory / name,
            lambda tmp: save_file(materialised, str(tmp), metadata={"format": "pt"}),
        )
        materialised = None  # free this shard's copy before the next one
        written.append(directory / name)
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: name for shard, name in zip(shards, names) for k in shard},
        }
        write_json(index, directory / "model.safetensors.index.json")
        written.append(directory / "model.safetensors.index.json")
    return written


def write_torch(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A plain state dict of tensors with ``torch.save`` (Meta's ``consolidated.00.pth``), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def write_json(obj, path: Path) -> None:
    atomic_write(
        path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    )
