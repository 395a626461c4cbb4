"""Family adapters and their registry.

Each adapter translates one checkpoint format's config and tensor names to llamakin's knobs and
canonical parameter names, both ways (see :mod:`llamakin.families.base`).
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import UnsupportedError
from . import (
    chatglm,
    diff_unilm,
    diffllama,
    glm,
    granite,
    internlm,
    llama,
    meta,
    mistral,
    native,
    qwen,
    qwen1,
)
from .base import Family, TensorRule

# Order matters for export of a config with no family: the first family that expresses it
# exactly. Hugging Face formats come first (what the ecosystem loads), then Meta's (the usual home
# of interleaved RoPE), then the original remote-code layouts, llamakin's own format last (it
# expresses everything).
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        llama.FAMILY,
        diffllama.FAMILY,
        qwen.QWEN2,
        qwen.QWEN3,
        mistral.FAMILY,
        granite.FAMILY,
        meta.FAMILY,
        glm.GLM,
        glm.GLM4,
        qwen1.FAMILY,
        internlm.INTERNLM,
        internlm.INTERNLM2,
        chatglm.CHATGLM2,
        chatglm.CHATGLM,
        diff_unilm.FAMILY,
        native.FAMILY,
    )
}
# The families transformers implements natively (a PEFT adapter names their HF modules).
HF_FAMILIES = ("llama", "mistral", "granite", "qwen2", "qwen3", "diffllama", "glm", "glm4")


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UnsupportedError(f"unknown family {name!r}; known families: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def detect_family(config: dict[str, Any], where: str) -> Family:
    """The adapter for a checkpoint config dict, by ``model_type`` then ``architectures``."""
    model_type = config.get("model_type")
    if model_type == "chatglm":  # v1 and v2/3 share the model_type
        return chatglm.chatglm_family(config)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    for arch in config.get("architectures") or ():
        for family in FAMILIES.values():
            if arch in family.architectures:
                return family
    described = f"model_type {model_type!r}" if model_type else "no model_type"
    raise UnsupportedError(
        f"{where} has {described}, which llamakin does not know; supported model types: "
        f"{', '.join(n for n in FAMILIES if n not in ('meta', 'chatglm2'))}."
    )


def family_for_export(config: ModelConfig, name: str | None = None) -> Family:
    """The family to save ``config`` in: ``name`` if given, else the config's own family, else the
    first that expresses every knob exactly."""
    if name is not None:
        family = get_family(name)
        reason = family.unsupported(config)
        if reason:
            raise UnsupportedError(f"cannot save as {name}: {reason}; pick another --to family.")
        return family
    if config.family in FAMILIES and FAMILIES[config.family].unsupported(config) is None:
        return FAMILIES[config.family]
    for family in FAMILIES.values():
        if family.unsupported(config) is None:
            return family
    raise UnsupportedError(
        "no known checkpoint format expresses this model's configuration exactly."
    )


__all__ = [
    "FAMILIES",
    "HF_FAMILIES",
    "Family",
    "TensorRule",
    "detect_family",
    "family_for_export",
    "get_family",
]
