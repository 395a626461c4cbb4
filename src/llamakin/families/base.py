"""What a family adapter is: config translation plus tensor rules, both directions.

A :class:`Family` turns a checkpoint's own config (``config.json``, ``params.json``, GGUF
metadata, ...) into a :class:`~llamakin.ModelConfig` and back, and lists one
:class:`TensorRule` per canonical model parameter saying which checkpoint tensors build it and
how (a rename, a concatenation, a RoPE reordering, ...), with the inverse for export. The model
knows nothing of families; adding a family is a new adapter module plus tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import ModelConfig
from ..errors import ConfigError, UnsupportedError
from .rules import TensorRule, fused_rows, fused_rows_partial, rename  # noqa: F401 (the adapters' vocabulary)
from .tables import Entry, rules_from_table


def require(config: dict[str, Any], key: str, where: str) -> Any:
    if config.get(key) is None:
        raise ConfigError(f"{where} has no {key!r}; the checkpoint's config is incomplete.")
    return config[key]


@dataclass
class Family:
    """Base class of all family adapters; subclasses override the four translation methods."""

    name: str
    description: str
    architectures: tuple[str, ...] = ()
    # Checkpoint tensors that carry no weights and are skipped on load (e.g. RoPE buffers).
    ignored: tuple[str, ...] = field(
        default=(r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)rotary_pos_emb\.inv_freq$")
    )
    # The output matrix's name, which tied checkpoints sometimes store anyway (a copy of the embedding).
    tied_output: str = "lm_head.weight"
    # Where the config lives and how weights are written on export.
    config_file: str = "config.json"
    weights_format: str = "safetensors"  # or "torch" (consolidated.00.pth, Meta's own loader)

    def config_from_checkpoint(self, config: dict[str, Any]) -> ModelConfig:
        raise NotImplementedError

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        raise NotImplementedError

    def tensor_table(self) -> Mapping[str, Entry]:
        """This format's tensor names (see :mod:`llamakin.families.tables`)."""
        raise NotImplementedError

    def tensor_rules(self, config: ModelConfig) -> list[TensorRule]:
        """The rule of every parameter of a ``config`` model, from :meth:`tensor_table`."""
        return rules_from_table(self.tensor_table(), config, self.name)

    def is_ignored(self, tensor_name: str, tied: bool = False) -> bool:
        if tied and tensor_name == self.tied_output:
            return True
        return any(re.search(p, tensor_name) for p in self.ignored)

    def unsupported(self, config: ModelConfig) -> str | None:
        """Why this family cannot store ``config`` exactly, or None if it can.

        The test is a round trip: the exported config must read back as the same knobs.
        """
        try:
            back = self.config_from_checkpoint(self.config_to_checkpoint(config))
        except (ConfigError, UnsupportedError) as e:
            return str(e)
        ours = config.replace(family=self.name)
        if back != ours:
            diffs = [k for k in ours.to_dict() if getattr(back, k) != getattr(ours, k)]
            return f"the {self.name} format cannot express {', '.join(diffs)}"
        return None
