"""Checkpoint conversion between formats and RoPE layouts (``llamakin convert``, docs/variants.md §2.3).

Changing the RoPE layout is an exact weight transform, not a re-training job: interleaved RoPE
on Meta-ordered q/k rows computes the same attention scores as rotate_half RoPE on rows
permuted by :func:`~llamakin.transforms.interleaved_to_half` — biases included, and so are
per-head q/k norm weights, which live on the same feature axis.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import empty_model, parse_dtype, save_pretrained, stored_dtype
from .config import ROPE_LAYOUTS, ModelConfig, RopeScaling
from .errors import CheckpointError, ConfigError, UnsupportedError
from .families import family_for_export, get_family
from .loading import load
from .model import Transformer
from .source import resolve_model, resolve_path
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
    return with_config(model, config.replace(rope_layout=target), state)


def with_config(
    model: Transformer, config: ModelConfig, state: dict[str, torch.Tensor] | None = None
) -> Transformer:
    """A new model with ``config`` and ``state`` (default: ``model``'s own parameters)."""
    converted = empty_model(config, model.dtype, model.device)
    converted.load_state_dict(model.state_dict() if state is None else state)
    return converted.eval()


def fold_pair_norm(model: Transformer) -> Transformer:
    """unilm -> DiffLlama: fold the differential pair norm's weight into ``o_proj`` (docs/variants.md §7.3).

    The norm's output, scaled per feature c of each pair by ``w[c]``, feeds ``o_proj`` only, so
    multiplying ``o_proj``'s column ``pair * 2hd + c`` by ``w[c]`` computes the same function
    without the weight.
    """
    config = model.config
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(config.num_layers):
        w = state.pop(f"layers.{i}.attn.pair_norm.weight")
        o = state[f"layers.{i}.attn.o_proj.weight"]
        state[f"layers.{i}.attn.o_proj.weight"] = (o.view(o.shape[0], -1, w.shape[0]) * w).reshape(
            o.shape
        )
    return with_config(model, config.replace(diff_norm_affine=False), state)


def unfold_pair_norm(model: Transformer) -> Transformer:
    """DiffLlama -> unilm: a pair norm with unit weights computes the same as one without."""
    state = dict(model.state_dict())
    for i in range(model.config.num_layers):
        state[f"layers.{i}.attn.pair_norm.weight"] = torch.ones(
            2 * model.config.head_dim, dtype=model.dtype
        )
    return with_config(model, model.config.replace(diff_norm_affine=True), state)


def drop_inference_extensions(model: Transformer) -> Transformer:
    """Remove Qwen v1's logn attention and dynamic NTK (inference-time only; no weights change)."""
    scaling = (
        RopeScaling()
        if model.config.rope_scaling.type == "qwen_dynamic"
        else model.config.rope_scaling
    )
    return with_config(
        model, model.config.replace(logn_attention_length=None, rope_scaling=scaling)
    )


# Rewrites a conversion may apply so the target format can store the model, each as
# (description, applies to config, new config, model transform). All are exact in float32; the
# norm-order one changes half-precision rounding and the last one behaviour past Qwen's trained
# length. The converter reports every one it applies.
REWRITES: list[
    tuple[
        str,
        Callable[[ModelConfig], bool],
        Callable[[ModelConfig], ModelConfig],
        Callable[[Transformer], Transformer],
    ]
] = [
    (
        "RoPE rows permuted to the rotate_half order",
        lambda c: c.rope_layout == "interleaved",
        lambda c: c.replace(rope_layout="half"),
        lambda m: convert_rope_layout(m, "half"),
    ),
    (
        "RoPE rows permuted to the interleaved order",
        lambda c: c.rope_layout == "half",
        lambda c: c.replace(rope_layout="interleaved"),
        lambda m: convert_rope_layout(m, "interleaved"),
    ),
    (
        "differential pair-norm weight folded into o_proj",
        lambda c: c.diff_norm_affine,
        lambda c: c.replace(diff_norm_affine=False),
        fold_pair_norm,
    ),
    (
        "unit pair-norm weight added",
        lambda c: c.attention_kind == "differential" and not c.diff_norm_affine,
        lambda c: c.replace(diff_norm_affine=True),
        unfold_pair_norm,
    ),
    (
        "RMSNorm weight multiply moved to the other side of the cast (the same in float32; in half "
        "precision the two reference implementations round differently, docs/variants.md §6.2)",
        lambda c: c.norm_type == "rmsnorm",
        lambda c: c.replace(
            rmsnorm_order="cast_then_mul" if c.rmsnorm_order == "mul_then_cast" else "mul_then_cast"
        ),
        lambda m: with_config(
            m,
            m.config.replace(
                rmsnorm_order="cast_then_mul"
                if m.config.rmsnorm_order == "mul_then_cast"
                else "mul_then_cast"
            ),
        ),
    ),
    (
        "cached keys re-rotated with the current dynamic-NTK base (InternLM v1's cache) instead of kept as "
        "rotated (transformers'); the same until a cached generation passes max_position_embeddings",
        lambda c: c.rope_scaling.type == "dynamic",
        lambda c: c.replace(rope_cached_keys=not c.rope_cached_keys),
        lambda m: with_config(m, m.config.replace(rope_cached_keys=not m.config.rope_cached_keys)),
    ),
    (
        "dropped the inference-only logn attention / dynamic NTK (they act only past the trained length)",
        lambda c: c.logn_attention_length is not None or c.rope_scaling.type == "qwen_dynamic",
        lambda c: c.replace(
            logn_attention_length=None,
            rope_scaling=RopeScaling() if c.rope_scaling.type == "qwen_dynamic" else c.rope_scaling,
        ),
        drop_inference_extensions,
    ),
]


def fit_to_family(
    model: Transformer, name: str, keep_rope_layout: bool = False
) -> tuple[Transformer, list[str]]:
    """``model`` rewritten (exactly, see :data:`REWRITES`) so family ``name`` can store it, and what
    was done. ``keep_rope_layout`` rules out the RoPE permutations (the user asked for a layout)."""
    family = get_family(name)
    reason = family.unsupported(model.config)
    if reason is None:
        return model, []
    rewrites = [r for r in REWRITES if not (keep_rope_layout and r[0].startswith("RoPE"))]
    for size in range(1, len(rewrites) + 1):
        for combo in itertools.combinations(rewrites, size):
            config = model.config
            if not all(applies(config) for _, applies, _, _ in combo):
                continue
            for _, _, change, _ in combo:
                config = change(config)
            if family.unsupported(config) is None:
                for _, _, _, transform in combo:
                    model = transform(model)
                return model, [description for description, *_ in combo]
    raise UnsupportedError(f"cannot save as {name}: {reason}; pick another --to family.")


NO_TOKENIZER = "no tokenizer"  # in the description of a GGUF written without one


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    to: str | None = None,
    rope_layout: str | None = None,
    dtype: str | torch.dtype | None = None,
    gguf_type: str = "F16",
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Load ``source``, optionally change RoPE layout and dtype, save as ``to`` (default: the
    source's format if it can express the result, else the first format that can). A
    destination ending in ``.gguf`` writes GGUF (matrices in ``gguf_type``) with the source's
    tokenizer, or ``tokenizer``'s (a path or catalog name). An existing destination file, or
    directory holding a checkpoint, is replaced only with ``overwrite``. Returns the destination
    and the format written."""
    check_destination(Path(destination).expanduser(), overwrite)
    try:
        return _convert(source, destination, to, rope_layout, dtype, gguf_type, tokenizer)
    except OSError as e:  # a disk that fills up, a directory made read-only meanwhile, ...
        raise CheckpointError(
            f"cannot write {destination} ({e.strerror or e}); choose another destination."
        ) from None


_CHECKPOINT_MARKERS = (
    "config.json",
    "params.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "consolidated.00.pth",
)


def check_destination(destination: Path, overwrite: bool) -> None:
    """Refuse, before any work, a destination that cannot be written or would replace something."""
    as_file = str(destination).lower().endswith(".gguf")
    if destination.exists():
        if as_file and destination.is_dir():
            raise CheckpointError(f"{destination} is a directory; give a .gguf file name to write.")
        if not as_file and not destination.is_dir():
            raise CheckpointError(
                f"{destination} is an existing file, not a directory; choose another destination."
            )
        occupied = destination.is_file() or any(
            (destination / m).exists() for m in _CHECKPOINT_MARKERS
        )
        if occupied and not overwrite:
            raise CheckpointError(
                f"{destination} already holds a checkpoint; pass --force to replace it, or choose "
                "another destination."
            )
    ancestor = destination.parent if as_file or not destination.exists() else destination
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointError(f"cannot write {destination}: {ancestor} is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"cannot write {destination}: {ancestor} is not writable by this user."
        )


def _convert(source, destination, to, rope_layout, dtype, gguf_type, tokenizer) -> tuple[Path, str]:
    if str(destination).lower().endswith(".gguf"):
        from .gguf_export import save_gguf
        from .io.gguf import GGUFFile

        if rope_layout not in (None, "half"):
            raise ConfigError(
                "GGUF files store q/k in llama.cpp's own order; drop --rope-layout for .gguf output."
            )
        source = resolve_model(source)  # a catalog name: its file, whose tokenizer goes along
        tokenizer_source = source.path if tokenizer is None else resolve_path(tokenizer)
        save_gguf(load(source), destination, quant=gguf_type, tokenizer_source=tokenizer_source)
        tokenizer_kind = GGUFFile(destination).metadata.get("tokenizer.ggml.model")
        tokenizer_note = NO_TOKENIZER if tokenizer_kind is None else f"{tokenizer_kind} tokenizer"
        return Path(destination), f"GGUF ({gguf_type}, {tokenizer_note})"
    if dtype is None:
        dtype = stored_dtype(source)  # keep the source's precision (and size)
    model = load(source, dtype=parse_dtype(dtype))
    if rope_layout is not None:
        model = convert_rope_layout(model, rope_layout)
    notes: list[str] = []
    if to is not None:
        model, notes = fit_to_family(model, to, keep_rope_layout=rope_layout is not None)
    family = family_for_export(model.config, to)
    save_pretrained(model, destination, family=family.name)
    described = family.name + (f" ({'; '.join(notes)})" if notes else "")
    return Path(destination), described
