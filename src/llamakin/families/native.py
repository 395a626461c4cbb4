"""llamakin's own format: ``config.json`` holding the :class:`ModelConfig` knobs verbatim and
safetensors under the canonical parameter names. It expresses every configuration, including
ones no other format can (say, interleaved RoPE with q/k biases), so nothing is ever lost."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError
from .base import Family, TensorRule, rename
from .tables import canonical_parameters

FORMAT_KEY = "llamakin_config"


class NativeFamily(Family):
    def config_from_checkpoint(self, config: dict[str, Any]) -> ModelConfig:
        knobs = config.get(FORMAT_KEY)
        if not isinstance(knobs, dict):
            raise ConfigError(
                f"a llamakin config.json needs a {FORMAT_KEY!r} object with the model's knobs."
            )
        return ModelConfig.from_dict({**knobs, "family": self.name})

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        knobs = config.replace(family=None).to_dict()
        del knobs["family"]
        return {"model_type": self.name, FORMAT_KEY: knobs}

    def tensor_rules(self, config: ModelConfig) -> list[TensorRule]:
        return [rename(name, name) for name in canonical_parameters(config)]


FAMILY = NativeFamily(
    name="llamakin", description="llamakin's own format (every knob, canonical tensor names)"
)
