"""GLM-4 in Hugging Face layout: ``model_type: glm`` (GLM-4-9B) and ``glm4`` (GLM-4-0414)
(docs/variants.md §6.3).

RoPE rotates only the first ``partial_rotary_factor`` (default 0.5) of each head, in
interleaved pairs; q/k/v have a bias (``attention_bias``), o has none; the MLP's gate and up are
one ``gate_up_proj`` matrix, gate rows first. ``glm4`` adds a norm on each branch output.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .hf import HFDecoderFamily


class GlmFamily(HFDecoderFamily):
    post_norms: bool = False

    def family_knobs(self, hf: dict[str, Any]) -> dict[str, Any]:
        bias = bool(hf.get("attention_bias", True))
        return dict(
            rope_layout="interleaved",
            q_bias=bias,
            k_bias=bias,
            v_bias=bias,
            post_sublayer_norms=self.post_norms,
        )

    def family_keys(self, config: ModelConfig) -> dict[str, Any]:
        return {"attention_bias": config.q_bias}


class Glm4Family(GlmFamily):
    post_norms = True


_COMMON = dict(
    fused_gate_up=True,
    default_max_positions=131072,
    default_eps=1.5625e-07,
    default_partial_rotary=0.5,
)
GLM = GlmFamily(
    name="glm",
    description="GLM-4 (HF GlmForCausalLM; half-dim interleaved RoPE, fused gate_up)",
    architectures=("GlmForCausalLM",),
    **_COMMON,
)
GLM4 = Glm4Family(
    name="glm4",
    description="GLM-4-0414 (HF Glm4ForCausalLM; adds post-attention/post-MLP norms)",
    architectures=("Glm4ForCausalLM",),
    **_COMMON,
)
