"""Checkpoint conversion between formats and RoPE layouts (``llamakin convert``, spec §2.3).

Changing the RoPE layout is an exact weight transform, not a re-training job: interleaved RoPE
on Meta-ordered q/k rows computes the same attention scores as rotate_half RoPE on rows
permuted by :func:`~llamakin.transforms.interleaved_to_half` — biases included, and so are
per-head q/k norm weights, which live on the same feature axis.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import empty_model, load, parse_dtype, save_pretrained, stored_dtype
from .config import ROPE_LAYOUTS
from .errors import ConfigError
from .families import family_for_export
from .model import Transformer
from .transforms import rope_reorder


def convert_rope_layout(model: Transformer, target: str) -> Transformer:
    """A copy of ``model`` computing the same function with RoPE layout ``target``."""
    if target not in ROPE_LAYOUTS:
        raise ConfigError(f"unknown RoPE layout {target!r}; use one of {', '.join(ROPE_LAYOUTS)}.")
    config = model.config
    if config.rope_layout == target:
        return model
    H, Hkv, hd, rd = config.num_heads, config.num_kv_heads, config.head_dim, config.rotary_dim

    def reorder(t: torch.Tensor, heads: int) -> torch.Tensor:
        return rope_reorder(t, heads, rd, config.rope_layout, target)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(config.num_layers):
        a = f"layers.{i}.attn."
        for suffix in ("qkv.weight", "qkv.bias"):
            if a + suffix in state:
                q, k, v = state[a + suffix].split((H * hd, Hkv * hd, Hkv * hd))
                state[a + suffix] = torch.cat((reorder(q, H), reorder(k, Hkv), v))
        for norm in ("q_norm.weight", "k_norm.weight"):
            if a + norm in state:
                state[a + norm] = reorder(state[a + norm], 1)
    converted = empty_model(config.replace(rope_layout=target), model.dtype, model.device)
    converted.load_state_dict(state)
    return converted.eval()


def convert_checkpoint(source: str | Path, destination: str | Path, to: str | None = None,
                       rope_layout: str | None = None, dtype: str | torch.dtype | None = None,
                       gguf_type: str = "F16") -> tuple[Path, str]:
    """Load ``source``, optionally change RoPE layout and dtype, save as ``to`` (default: the
    source's format if it can express the result, else the first format that can). A
    destination ending in ``.gguf`` writes GGUF (matrices in ``gguf_type``) with the source's
    tokenizer. Returns the destination and the format written."""
    if str(destination).lower().endswith(".gguf"):
        from .gguf_export import save_gguf

        model = load(source)
        if rope_layout not in (None, "half"):
            raise ConfigError("GGUF files store q/k in llama.cpp's own order; drop --rope-layout for .gguf output.")
        save_gguf(model, destination, quant=gguf_type, tokenizer_source=source)
        return Path(destination), f"GGUF ({gguf_type})"
    if dtype is None:
        dtype = stored_dtype(source)  # keep the source's precision (and size)
    model = load(source, dtype=parse_dtype(dtype))
    if rope_layout is not None:
        model = convert_rope_layout(model, rope_layout)
    family = family_for_export(model.config, to)
    save_pretrained(model, destination, family=family.name)
    return Path(destination), family.name
