"""LoRA adapters in PEFT's format, both ways.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` (``peft_type: LORA``, ``r``,
``lora_alpha``, ``target_modules``, optional per-module ``rank_pattern``/``alpha_pattern``) and
``adapter_model.safetensors`` whose tensors are named
``base_model.model.<transformers module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]`` (PEFT's checkpoint-format guide; the adapter name ``default`` is stripped on save).
The update of a module is ``scale * B @ A`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``).

The transformers module of each llamakin projection part comes from the family adapter's tensor
rules: the rule that builds ``layers.{i}.attn.qkv.weight`` from ``...q_proj.weight``,
``...k_proj.weight`` and ``...v_proj.weight`` names the three modules in row order, so the
names are never written twice. A base held in the interleaved (Meta) RoPE order gets its q/k
``B`` rows permuted exactly like the base weights (``interleaved_to_half``, docs/variants.md §2.3); ``A``
acts on the input side and stays as it is.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, UnsupportedError
from ..families import HF_FAMILIES, Family, get_family
from ..model import Transformer
from ..transforms import rope_reorder
from .layers import LoraLinear
from .model import attach, lora_layers, merge, projection_parts

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$"
)


def hf_family(config: ModelConfig) -> tuple[Family, bool]:
    """The transformers family whose module names the adapter uses, and whether q/k rows are
    in the interleaved RoPE order (and need the permutation on the way)."""
    if config.rope_layout not in ("half", "interleaved"):
        raise UnsupportedError(
            f"LoRA adapters in PEFT's format need a transformers model class; this model's "
            f"{config.rope_layout!r} RoPE has none."
        )
    permute = config.rope_layout == "interleaved"
    hf_config = config.replace(rope_layout="half") if permute else config
    for name in (config.family, *HF_FAMILIES):
        if name in HF_FAMILIES and get_family(name).unsupported(hf_config) is None:
            return get_family(name), permute
    raise UnsupportedError(
        "no transformers model class expresses this model exactly, so a PEFT adapter has no "
        "module names to use; export the merged model instead (--merge)."
    )


def module_names(model: Transformer, family: Family) -> dict[tuple[str, str], str]:
    """``(llamakin module path, part) -> transformers module name`` for every projection part."""
    rules = {r.canonical: r for r in family.tensor_rules(model.config.replace(rope_layout="half"))}
    names = {}
    for path, parts in projection_parts(model):
        rule = rules.get(path + ".weight")
        if rule is None or len(rule.sources) != len(parts):
            continue  # a fused module in this family (GLM's gate_up_proj): no one-to-one name
        for (part, _), source in zip(parts, rule.sources):
            names[(path, part)] = source.removesuffix(".weight")
    return names


def _rope_rows(
    model: Transformer, part: str, b: torch.Tensor, source: str, target: str
) -> torch.Tensor:
    c = model.config
    heads = c.num_heads if part == "q" else c.num_kv_heads
    return rope_reorder(b, heads, c.rotary_dim, source, target)


def _compact(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def save_adapter(model: Transformer, directory: str | Path, base_model: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory; returns it."""
    layers = lora_layers(model)
    if not any(layer.adapted for layer in layers.values()):
        raise UnsupportedError(
            "the model has no LoRA adapter to export; train with --recipe lora-sft or load one."
        )
    family, permute = hf_family(model.config)
    names = module_names(model, family)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropout = 0.0
    for path, layer in layers.items():
        if isinstance(layer.dropout, torch.nn.Dropout):
            dropout = layer.dropout.p
        for part in layer.adapted:
            if (path, part) not in names:
                raise UnsupportedError(
                    f"{family.name} models fuse the projection that llamakin's {path} ({part}) "
                    "adapts, so PEFT has no module for it; export the merged model (--merge)."
                )
            hf = names[(path, part)]
            a, b = layer.lora_A[part].detach(), layer.lora_B[part].detach()
            if permute and part in ("q", "k"):
                b = _rope_rows(model, part, b, "interleaved", "half")
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = a.cpu().contiguous()
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.cpu().contiguous()
            ranks[hf] = a.shape[0]
            alphas[hf] = layer.scales[part] * a.shape[0]
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    short = sorted({hf.rsplit(".", 1)[-1] for hf in ranks})
    everywhere = {hf for hf in names.values() if hf.rsplit(".", 1)[-1] in short}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": _compact(alpha),
        "lora_dropout": dropout,
        # short names when every layer is adapted alike (what PEFT users write), else exact module names
        "target_modules": short if everywhere == set(ranks) else sorted(ranks),
        "rank_pattern": {re.escape(hf): v for hf, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(hf): _compact(v) for hf, v in alphas.items() if v != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


# -- reading adapters trained elsewhere ----------------------------------------------------------------
def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` and the adapter tensors of a PEFT directory."""
    from ..checkpoint import read_json

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} is not a directory; give a PEFT adapter directory "
            f"({CONFIG_FILE} + {WEIGHTS_FILE})."
        )
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{directory} has no {CONFIG_FILE}; it is not a PEFT adapter directory."
        )
    config = read_json(directory / CONFIG_FILE)
    if (directory / WEIGHTS_FILE).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{directory / WEIGHTS_FILE} cannot be read ({e}); copy the adapter again."
            ) from None
    elif (directory / LEGACY_WEIGHTS_FILE).is_file():
        try:
            tensors = torch.load(
                directory / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True
            )
        except Exception as e:  # pickle errors have many types
            raise CheckpointError(
                f"{directory / LEGACY_WEIGHTS_FILE} cannot be read ({e}); copy the adapter again."
            ) from None
    else:
        raise CheckpointError(
            f"{directory} has no {WEIGHTS_FILE} (or {LEGACY_WEIGHTS_FILE}); it is not a PEFT adapter "
            "directory."
        )
    return config, tensors


def _check_config(config: dict[str, Any], where: str) -> None:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise UnsupportedError(
            f"{where} is a {kind} adapter; llamakin loads LoRA adapters (peft_type LORA) only."
        )
    refusals = [
        (config.get("use_dora"), "uses DoRA (use_dora), which llamakin does not implement"),
        (
            config.get("fan_in_fan_out"),
            "stores transposed (fan_in_fan_out) weights, which only GPT-2 style models use",
        ),
        (
            config.get("modules_to_save"),
            f"also replaces whole modules ({config.get('modules_to_save')}) "
            "(modules_to_save), which llamakin does not load",
        ),
        (
            config.get("bias") not in (None, "none"),
            f"trains biases (bias={config.get('bias')!r}), which llamakin does not load",
        ),
    ]
    for bad, why in refusals:
        if bad:
            raise UnsupportedError(
                f"{where} {why}; use an adapter without it or merge it with PEFT first."
            )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module name that it ends (as a regex)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def load_adapter(
    model: Transformer, directory: str | Path, merge_weights: bool = False
) -> Transformer:
    """Attach a PEFT LoRA adapter to ``model`` (in place): as trainable :class:`LoraLinear`
    layers, or folded into the weights with ``merge_weights`` (plain layers, fastest inference)."""
    specs, weights, dropout = adapter_weights(model, directory)
    attach(model, specs, dropout)
    with torch.no_grad():
        for (path, part), (a, b) in weights.items():
            layer: LoraLinear = model.get_submodule(path)
            layer.lora_A[part].copy_(a)
            layer.lora_B[part].copy_(b)
    return merge(model) if merge_weights else model


def adapter_weights(model: Transformer, directory: str | Path):
    """A PEFT LoRA adapter read and checked against ``model``: ``(specs, weights, dropout)`` with
    ``specs`` as :func:`attach` takes them (module path -> (rank, scale) per part) and ``weights``
    ``(module path, part) -> (A, B)`` in llamakin's row order (q/k rows permuted for an
    interleaved-RoPE base)."""
    config, tensors = read_adapter(directory)
    where = str(Path(directory).expanduser() / CONFIG_FILE)
    _check_config(config, where)
    family, permute = hf_family(model.config)
    by_name = {hf: key for key, hf in module_names(model, family).items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise UnsupportedError(
                f"{directory}: tensor {key!r} is not a LoRA A/B weight of a linear layer; "
                "llamakin loads LoRA on q, k, v, o, gate, up, down and lm_head only."
            )
        pairs.setdefault(m["module"], {})[m["which"]] = value
    if not pairs:
        raise CheckpointError(f"{directory} holds no LoRA tensors.")
    layer_parts = dict(projection_parts(model))
    specs: dict[str, tuple[dict[str, int], dict[str, float]]] = {}
    weights: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in sorted(pairs.items()):
        if module not in by_name:
            raise UnsupportedError(
                f"{directory} adapts {module!r}, which this {family.name} model does not have "
                "as a LoRA target (q, k, v, o, gate, up, down, lm_head); check the base model."
            )
        if set(ab) != {"A", "B"}:
            raise CheckpointError(
                f"{directory} has lora_{'A' if 'A' in ab else 'B'} but not the other for {module!r}."
            )
        path, part = by_name[module]
        a, b = ab["A"], ab["B"]
        rows = dict(layer_parts[path])[part]
        layer_in = model.get_submodule(path).in_features
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != layer_in or b.shape != (rows, r):
            raise CheckpointError(
                f"{directory}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)} but the "
                f"base needs [r, {layer_in}] and [{rows}, r]; the adapter was trained for another model."
            )
        alpha = _pattern_value(
            config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)
        )
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if permute and part in ("q", "k"):
            b = _rope_rows(model, part, b, "half", "interleaved")
        ranks, scales = specs.setdefault(path, ({}, {}))
        ranks[part], scales[part] = r, scale
        weights[(path, part)] = (a, b)
    return specs, weights, float(config.get("lora_dropout") or 0.0)


__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "adapter_weights",
    "hf_family",
    "load_adapter",
    "module_names",
    "read_adapter",
    "save_adapter",
]
