"""Writing a file so that a crash never leaves it half-written (docs/architecture.md).

Every file llamakin writes for keeps (checkpoints, GGUF, safetensors, configs, training shards and
logs) goes through :func:`atomic_write`: the bytes go to a temporary file beside the target
(``.NAME.tmp-PID``, so a concurrent writer and a killed one are told apart), which is renamed over
the target only once complete (``os.replace`` is atomic within a directory); on any failure the
temporary is removed and the target is left as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def temporary_path(path: Path) -> Path:
    """Where :func:`atomic_write` writes ``path`` before renaming it into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary)`` and rename the result over ``path``; nothing is left on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
