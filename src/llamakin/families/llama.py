"""LLaMA 1/2/3 in Hugging Face layout (``model_type: llama``, docs/variants.md §3), including the optional
``attention_bias`` (q, k, v *and* o) and ``mlp_bias`` that IBM Granite Code uses (docs/variants.md §4)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .hf import HFDecoderFamily


class LlamaFamily(HFDecoderFamily):
    def family_knobs(self, hf: dict[str, Any]) -> dict[str, Any]:
        bias = bool(hf.get("attention_bias", False))
        return dict(
            q_bias=bias,
            k_bias=bias,
            v_bias=bias,
            o_bias=bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
        )

    def family_keys(self, config: ModelConfig) -> dict[str, Any]:
        return {"attention_bias": config.q_bias, "mlp_bias": config.mlp_bias}


FAMILY = LlamaFamily(
    name="llama",
    description="LLaMA 1/2/3 (HF LlamaForCausalLM; attention_bias/mlp_bias cover Granite Code)",
    architectures=("LlamaForCausalLM",),
)
