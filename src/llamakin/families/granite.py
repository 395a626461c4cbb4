"""IBM Granite 3.x in Hugging Face layout (``model_type: granite``, docs/variants.md §4): LLaMA with four
scalars. ``attention_multiplier`` *replaces* ``head_dim ** -0.5`` (its default is 1.0, not the
usual scale), ``logits_scaling`` divides the logits."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .hf import HFDecoderFamily


class GraniteFamily(HFDecoderFamily):
    def family_knobs(self, hf: dict[str, Any]) -> dict[str, Any]:
        bias = bool(hf.get("attention_bias", False))
        return dict(
            q_bias=bias,
            k_bias=bias,
            v_bias=bias,
            o_bias=bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
            logits_scaling=float(hf.get("logits_scaling", 1.0)),
            attention_scale=float(hf.get("attention_multiplier", 1.0)),
        )

    def family_keys(self, config: ModelConfig) -> dict[str, Any]:
        return {
            "attention_bias": config.q_bias,
            "mlp_bias": config.mlp_bias,
            "embedding_multiplier": config.embedding_multiplier,
            "residual_multiplier": config.residual_multiplier,
            "logits_scaling": config.logits_scaling,
            "attention_multiplier": config.scale,
        }


FAMILY = GraniteFamily(
    name="granite",
    description="IBM Granite 3.x (HF GraniteForCausalLM; embedding/attention/residual multipliers, logits scaling)",
    architectures=("GraniteForCausalLM",),
)
