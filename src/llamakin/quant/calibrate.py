"""Quantizing with calibration text (GPTQ, :mod:`llamakin.quant.gptq`) instead of rounding to nearest.

``llamakin.load(path, quantize="int8", calibration=TEXT)`` and ``llamakin quantize SRC DST --to int8
--calibrate FILE``: the float model is loaded in float32, its projections (and head) are quantized
by GPTQ on the first ``calibration_tokens`` tokens of the text, then module replacement
(:func:`llamakin.quant.model.quantize_model`) builds the same layers as round to nearest would
(only the integer values differ, so files keep their layout). Needs the float model in memory
once (unlike :func:`llamakin.quant.model.load_quantized`, which streams): a one-off cost.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import LlamakinError

CALIBRATION_TOKENS = 4096


def calibration_text(calibration: str | Path) -> str:
    """A :class:`~pathlib.Path` is read as a text file; a ``str`` is the text itself."""
    if isinstance(calibration, Path):
        try:
            return calibration.expanduser().read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise LlamakinError(
                f"cannot read the calibration text {calibration} ({e.strerror}); give a readable "
                "text file."
            ) from None
    if not isinstance(calibration, str):
        raise LlamakinError(
            f"calibration must be text (str) or a text file (pathlib.Path), not "
            f"{type(calibration).__name__}."
        )
    return calibration


def load_calibrated(
    source,
    mode: str,
    calibration: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    group_size: int = 32,
    calibration_tokens: int = CALIBRATION_TOKENS,
    head: str = "int8",
    activation_dtype: torch.dtype | None = None,
    collect: dict | None = None,
    progress=None,
):
    """The model of ``source`` with ``mode`` (int8/int4) projections chosen by GPTQ on
    ``calibration`` (see :func:`calibration_text`). ``collect`` receives each module's weight
    (as :func:`~llamakin.quant.model.quantize_model`'s). Returns ``(model, seconds of GPTQ)``."""
    from .. import checkpoint
    from ..resident import release_freed_memory
    from ..tokenizer import load_tokenizer
    from .gptq import calibration_ids, gptq_model
    from .model import quantize_model
    from .tensors import check_group_size

    if mode not in ("int8", "int4"):
        raise LlamakinError(
            f"calibration (GPTQ) quantizes to int8 or int4; quantize={mode!r} does not quantize "
            "from float weights. Use quantize='int8' or 'int4'."
        )
    if mode == "int4":
        check_group_size(group_size, group_size)
    if calibration_tokens < 1:
        raise LlamakinError(f"calibration_tokens must be positive, not {calibration_tokens}.")
    text = calibration_text(calibration)
    ids = calibration_ids(load_tokenizer(source), text, calibration_tokens)
    model = checkpoint.load(source, torch.float32, device)
    if mode == "int4":
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                check_group_size(group_size, m.in_features, f" ({name})")
    started = time.perf_counter()
    weights = gptq_model(model, ids, mode, group_size, head=head, progress=progress)
    seconds = time.perf_counter() - started
    if dtype != torch.float32:
        model = model.to(dtype)  # the rest of the model (norms, biases, embedding) in dtype
    quantize_model(
        model,
        mode,
        group_size,
        head=head,
        activation_dtype=activation_dtype,
        collect=collect,
        weights=weights,
    )
    release_freed_memory()
    return model.eval(), seconds
