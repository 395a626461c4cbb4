"""Put LoRA layers into a model, freeze the rest, merge them back out.

Targets are the logical projections of every block: ``q, k, v, o, gate, up, down`` and
optionally the output head ``lm_head`` (PEFT's ``q_proj``, ... names are accepted too).
:func:`projection_parts` says where each lives in llamakin's (partly fused) layers; it is the
only place that knows the model's module layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..model import Transformer
from ..model.linear import Linear
from .layers import LoraLinear
from .quantized import check_mode

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Hugging Face module names -> llamakin's logical names (what PEFT's target_modules list holds).
HF_NAMES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "lm_head": "lm_head",
}


def parse_targets(value: Any) -> tuple[str, ...]:
    """``"q,k,v"``, ``["q_proj", "v_proj"]`` or ``"all"`` -> logical names in canonical order."""
    items = [t for t in value.split(",")] if isinstance(value, str) else list(value)
    names = set()
    for item in (str(t).strip() for t in items):
        if item == "all":
            names.update(DEFAULT_TARGETS)
        elif item in TARGETS or item in HF_NAMES:
            names.add(HF_NAMES.get(item, item))
        elif item:
            raise ConfigError(
                f"unknown LoRA target {item!r}; choose from {', '.join(TARGETS)} (or 'all')."
            )
    if not names:
        raise ConfigError(
            "lora.targets is empty; name at least one projection, e.g. lora.targets=q,v."
        )
    return tuple(t for t in TARGETS if t in names)


@dataclass(frozen=True)
class LoraSettings:
    """Rank, ``alpha`` (the update is scaled by ``alpha / rank``), adapter dropout and targets; for
    QLoRA ``quantize`` (int4/int8: the frozen base held quantized, :mod:`llamakin.lora.quantized`)
    and the int4 ``group_size``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    quantize: str | None = None
    group_size: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}.")
        object.__setattr__(self, "targets", parse_targets(self.targets))
        object.__setattr__(self, "quantize", check_mode(self.quantize, self.group_size))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoraSettings":
        known = {"rank", "alpha", "dropout", "targets", "quantize", "group_size"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown LoRA setting lora.{unknown[0]}; valid: {', '.join(sorted(known))}."
            )
        return cls(**values)


def projection_parts(model: Transformer) -> list[tuple[str, tuple[tuple[str, int], ...]]]:
    """Every projection of the model as ``(module path, ((logical name, rows), ...))`` in row order."""
    out = []
    for i, block in enumerate(model.layers):
        attn, mlp = block.attn, block.mlp
        q_rows, k_rows, v_rows = attn.split_sizes
        out.append((f"layers.{i}.attn.qkv", (("q", q_rows), ("k", k_rows), ("v", v_rows))))
        out.append((f"layers.{i}.attn.o_proj", (("o", attn.o_proj.out_features),)))
        if hasattr(mlp, "gate_up"):
            inter = mlp.down.in_features
            out.append((f"layers.{i}.mlp.gate_up", (("gate", inter), ("up", inter))))
        else:
            out.append((f"layers.{i}.mlp.up", (("up", mlp.up.out_features),)))
        out.append((f"layers.{i}.mlp.down", (("down", mlp.down.out_features),)))
    if model.lm_head is not None:
        out.append(("lm_head", (("lm_head", model.lm_head.out_features),)))
    return out


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def attach(
    model: Transformer,
    specs: dict[str, tuple[dict[str, int], dict[str, float]]],
    dropout: float = 0.0,
) -> Transformer:
    """Replace the named projections by :class:`LoraLinear` layers (in place): ``specs`` maps a
    module path to (rank per part, scale per part). The base is frozen, the adapters trainable."""
    freeze(model)
    for path, parts in projection_parts(model):
        if path not in specs:
            continue
        ranks, scales = specs[path]
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, attr)
        if isinstance(base, LoraLinear):
            raise ConfigError(
                f"{path} already has a LoRA adapter; merge it first (llamakin.lora.merge)."
            )
        setattr(parent, attr, LoraLinear(base, parts, ranks, scales, dropout))
    return model


def apply_lora(model: Transformer, settings: LoraSettings) -> Transformer:
    """Fresh (PEFT-initialised) adapters on ``settings.targets``; everything else frozen."""
    if "lm_head" in settings.targets and model.lm_head is None:
        raise ConfigError(
            "lora.targets has lm_head but this model ties its output head to the embedding matrix; "
            "drop lm_head from the targets."
        )
    specs = {}
    for path, parts in projection_parts(model):
        chosen = [name for name, _ in parts if name in settings.targets]
        if chosen:
            specs[path] = ({n: settings.rank for n in chosen}, {n: settings.scale for n in chosen})
    return attach(model, specs, settings.dropout)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (in place) and restore plain layers."""
    for path, layer in lora_layers(model).items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, layer.merge_())
    return model


def hold_frozen_matrices_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen projection matrix of ``model`` in ``dtype`` (in place); bytes freed.

    For training under autocast to ``dtype`` (a LoRA run in bfloat16, README "Fine-tuning (LoRA)"):
    autocast casts each float32 weight to ``dtype`` on every product, and backward
    reuses that cast, so a frozen matrix held in ``dtype`` computes exactly the same products and
    gradients (the same rounding, done once) without the per-step casts and in half the memory.
    Only :class:`~llamakin.model.linear.Linear` weights that take no gradient and that nothing
    else holds change: the embedding table (also a tied head's), norms, biases and the adapters stay
    as they are. The products must then run under autocast; a run's export reloads the float base.
    """
    elsewhere = {
        id(p)
        for module in model.modules()
        if not isinstance(module, Linear)
        for p in module.parameters(recurse=False)
    }
    freed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None) if isinstance(module, Linear) else None
        if (
            weight is None
            or weight.requires_grad
            or not weight.is_floating_point()
            or weight.dtype == dtype
            or id(weight) in elsewhere
        ):
            continue
        before = weight.nbytes
        weight.data = weight.data.to(dtype)
        freed += before - weight.nbytes
    return freed


def trainable_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


__all__ = [
    "DEFAULT_TARGETS",
    "HF_NAMES",
    "TARGETS",
    "LoraSettings",
    "apply_lora",
    "attach",
    "freeze",
    "hold_frozen_matrices_in",
    "lora_layers",
    "merge",
    "parse_targets",
    "projection_parts",
    "trainable_parameters",
]
