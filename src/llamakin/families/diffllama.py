"""Differential Transformer in Hugging Face layout (``model_type: diffllama``, docs/variants.md §7.2):
LLaMA with differential attention, heads paired j with j + H/2, no group-norm weight."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .hf import HFDecoderFamily


class DiffLlamaFamily(HFDecoderFamily):
    def family_knobs(self, hf: dict[str, Any]) -> dict[str, Any]:
        bias = bool(hf.get("attention_bias", False))
        return dict(
            attention_kind="differential", q_bias=bias, k_bias=bias, v_bias=bias, o_bias=bias
        )

    def family_keys(self, config: ModelConfig) -> dict[str, Any]:
        return {"attention_bias": config.q_bias, "lambda_std_dev": 0.1}


FAMILY = DiffLlamaFamily(
    name="diffllama",
    description="Differential Transformer (HF DiffLlamaForCausalLM)",
    architectures=("DiffLlamaForCausalLM",),
    default_eps=1e-5,
)
