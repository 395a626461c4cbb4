"""``llamakin quantize SRC DST --to int8|int4``: a checkpoint rewritten as a quantized one."""

from __future__ import annotations

from pathlib import Path

import torch

from .files import save_quantized
from .model import load_quantized
from .tensors import check_group_size


def quantize_checkpoint(
    source: str | Path,
    destination: str | Path,
    mode: str,
    group_size: int = 32,
    head: str = "int8",
    calibration: str | Path | None = None,
    calibration_tokens: int = 4096,
) -> Path:
    """Quantize every projection of ``source`` (any checkpoint ``llamakin.load`` reads) to ``mode``
    and write :mod:`llamakin.quant.files`' format to ``destination``. A GGUF's Q4_0/Q4_1 matrices
    go to int4 group 32 exactly; everything else is quantized from its float values. With
    ``calibration`` (text, or a text file as a ``Path``) every matrix is quantized from its float
    values by GPTQ on that text (:mod:`llamakin.quant.calibrate`)."""
    from ..catalog import resolve

    if mode == "int4":
        check_group_size(group_size, group_size)
    from ..errors import CheckpointError
    from ..tokenizer import load_tokenizer

    source = resolve(source)
    weights: dict[str, object] = {}
    if calibration is not None:
        from .calibrate import load_calibrated

        model, _ = load_calibrated(
            source,
            mode,
            calibration,
            group_size=group_size,
            calibration_tokens=calibration_tokens,
            head=head,
            activation_dtype=torch.float32,
            collect=weights,
        )
    else:
        model = load_quantized(
            source,
            torch.float32,
            "cpu",
            mode,
            group_size,
            activation_dtype=torch.float32,
            head=head,
            collect=weights,
        )
    out = save_quantized(model, destination, weights)
    try:  # the tokenizer goes along, so the directory is a complete model
        load_tokenizer(source).save(out)
    except CheckpointError:
        pass
    return out
