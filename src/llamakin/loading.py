"""``llamakin.load``: one entry point over the float loader (:mod:`llamakin.checkpoint`), the
quantized layers (:mod:`llamakin.quant`) and LoRA adapters (:mod:`llamakin.lora`). It sits above
all three so that none of them imports another's loader (no import cycle)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .errors import LlamakinError
from .model import Transformer
from .quant.files import is_quantized_checkpoint, load_quantized_checkpoint
from .quant.model import load_quantized, parse_mode, use_exact_int8_head
from .source import ModelSource, resolve_model
from .validation import parse_device


def load(
    path: str | Path | ModelSource,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    quantize: str | None = None,
    group_size: int = 32,
    adapter: str | Path | None = None,
    calibration: str | Path | None = None,
    calibration_tokens: int = 4096,
) -> Transformer:
    """Load a checkpoint: a ``.gguf`` file, a Hugging Face directory (config.json + safetensors or
    pytorch_model.bin), a Meta/Mistral native directory (params.json + consolidated.*), llamakin's
    own format (float or quantized), or the name of a catalog model (pulled on first use); see
    :mod:`llamakin.source`.

    ``quantize``: ``None`` loads float weights in ``dtype`` (quantized files dequantized);
    ``"int8"``/``"int4"`` quantize the projections (int4 in groups of ``group_size``); ``"auto"``
    keeps a file's quantization where it maps onto those layouts (see :mod:`llamakin.quant.model`).

    ``adapter``: a PEFT LoRA adapter directory, merged into the weights (``scale * B @ A`` added
    in float32; :func:`llamakin.lora.load_adapter` keeps it as separate trainable layers). It
    needs float weights (``quantize=None``; ``"auto"`` then means float).

    ``calibration``: text (a ``str``, or a ``pathlib.Path`` of a text file) on which
    ``"int8"``/``"int4"`` choose their integer values by GPTQ (the first ``calibration_tokens``
    tokens; :mod:`llamakin.quant.calibrate`) instead of rounding to nearest.
    """
    dtype = checkpoint.parse_dtype(dtype)
    mode = parse_mode(quantize)
    device = parse_device(device)
    model_source = resolve_model(path)
    if adapter is not None and mode == "auto":
        mode = None  # an adapter is merged into float weights
    if adapter is not None and mode is not None:
        raise LlamakinError(
            f"a LoRA adapter is merged into float weights, so it cannot be combined with "
            f"quantize={quantize!r}; load with quantize=None (CLI: --quantize none)."
        )
    if calibration is not None:
        if adapter is not None:
            raise LlamakinError("calibration (GPTQ) and a LoRA adapter cannot be combined.")
        from .quant.calibrate import load_calibrated

        model, _ = load_calibrated(
            model_source,
            mode,
            calibration,
            dtype,
            device,
            group_size,
            calibration_tokens,
        )
    elif not model_source.is_gguf and is_quantized_checkpoint(model_source.path):
        model = load_quantized_checkpoint(model_source.path, dtype, device, dequantize=mode is None)
    elif mode is not None:
        model = load_quantized(model_source.path, dtype, device, mode, group_size)
    else:
        model = checkpoint.load(model_source, dtype, device)
        if adapter is not None:
            from .lora import load_adapter

            load_adapter(model, adapter, merge_weights=True)
        return model
    use_exact_int8_head(model)  # an int8 output head, where this CPU multiplies it exactly
    return model
