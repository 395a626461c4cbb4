"""Mistral in Hugging Face layout (``model_type: mistral``): LLaMA with an optional sliding
window on every layer (docs/variants.md §8.2; transformers' ``sliding_window_overlay``)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .hf import HFDecoderFamily


class MistralFamily(HFDecoderFamily):
    def family_knobs(self, hf: dict[str, Any]) -> dict[str, Any]:
        return {"sliding_window": hf.get("sliding_window")}

    def family_keys(self, config: ModelConfig) -> dict[str, Any]:
        return {"sliding_window": config.sliding_window}


FAMILY = MistralFamily(
    name="mistral",
    description="Mistral (HF MistralForCausalLM; optional sliding window)",
    architectures=("MistralForCausalLM",),
    default_max_positions=4096 * 32,
)
