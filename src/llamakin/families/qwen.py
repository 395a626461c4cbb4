"""Qwen2 and Qwen3 in Hugging Face layout (docs/variants.md §5.2, §5.3).

Qwen2: q, k and v always carry a bias, o never does. Qwen3: ``attention_bias`` for all four,
an explicit ``head_dim``, and per-head RMSNorm of q and k before RoPE. Both can enable a sliding
window on the layers from ``max_window_layers`` on (or as ``layer_types`` lists).
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .hf import HFDecoderFamily, layer_types_keys, sliding_layers_from_types


def _sliding(hf: dict[str, Any]) -> dict[str, Any]:
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if window is None:
        return {"sliding_window": None, "sliding_window_layers": None}
    layers = sliding_layers_from_types(hf, hf.get("num_hidden_layers", 0), default_start=28)
    return {"sliding_window": window, "sliding_window_layers": layers}


class Qwen2Family(HFDecoderFamily):
    def family_knobs(self, hf: dict[str, Any]) -> dict[str, Any]:
        return dict(q_bias=True, k_bias=True, v_bias=True, **_sliding(hf))

    def family_keys(self, config: ModelConfig) -> dict[str, Any]:
        return layer_types_keys(config)


class Qwen3Family(HFDecoderFamily):
    def family_knobs(self, hf: dict[str, Any]) -> dict[str, Any]:
        bias = bool(hf.get("attention_bias", False))
        return dict(
            q_bias=bias, k_bias=bias, v_bias=bias, o_bias=bias, qk_norm=True, **_sliding(hf)
        )

    def family_keys(self, config: ModelConfig) -> dict[str, Any]:
        return {"attention_bias": config.q_bias, **layer_types_keys(config)}


QWEN2 = Qwen2Family(
    name="qwen2",
    description="Qwen2 / Qwen2.5 (HF Qwen2ForCausalLM; q/k/v bias, optional sliding window)",
    architectures=("Qwen2ForCausalLM",),
    default_max_positions=32768,
)
QWEN3 = Qwen3Family(
    name="qwen3",
    description="Qwen3 (HF Qwen3ForCausalLM; per-head q/k RMSNorm, explicit head_dim)",
    architectures=("Qwen3ForCausalLM",),
    default_max_positions=32768,
)
