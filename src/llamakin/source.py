"""One way to name a model: what every command and API entry point accepts.

``resolve_model(spec)`` turns what a user typed into a :class:`ModelSource`:

* a catalog name (``smollm2-135m-instruct``): pulled on first use, then its ``.gguf`` file;
* a ``.gguf`` file;
* a checkpoint directory: Hugging Face or llamakin (``config.json``) or Meta's layout
  (``params.json`` + ``consolidated.*``); reading which of them it is belongs to
  ``llamakin.checkpoint``;
* a file inside a checkpoint directory (``config.json``, ``model.safetensors``, ...): that directory.

``llamakin.load``, ``llamakin.load_tokenizer``, ``inspect``, ``arch-diff``, ``convert``,
``generate``, ``chat``, ``serve`` and ``train --set init_from=...`` all go through it. This module
only names things; it reads no config and no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .catalog import resolve as resolve_path


@dataclass(frozen=True)
class ModelSource:
    """A model located on disk: a GGUF file, or a checkpoint directory."""

    path: Path  # the .gguf file or the checkpoint directory
    kind: str  # "gguf" or "directory"
    named: Path | None = None  # the file the user named inside the directory, if any

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"

    def __fspath__(self) -> str:
        return str(self.path)


def is_gguf_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def resolve_model(spec: str | Path | ModelSource) -> ModelSource:
    """The model that ``spec`` names: a catalog name, a ``.gguf`` file, a checkpoint directory
    or a file inside one. Raises ``CheckpointError`` with one sentence when it names nothing."""
    if isinstance(spec, ModelSource):
        return spec
    path = resolve_path(spec)
    if path.is_file() and is_gguf_path(path):
        return ModelSource(path, "gguf")
    if path.is_dir():
        return ModelSource(path, "directory")
    return ModelSource(path.parent, "directory", named=path)


__all__ = ["ModelSource", "is_gguf_path", "resolve_model", "resolve_path"]
