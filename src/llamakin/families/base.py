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
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..errors import ConfigError, UnsupportedError
from ..transforms import concat_rows, split_rows


def _only(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0]


def _as_list(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


@dataclass(frozen=True)
class TensorRule:
    """One canonical parameter and the checkpoint tensors it comes from.

    ``to_canonical(sources)`` builds the parameter from the source tensors (in ``sources``
    order); ``from_canonical(param)`` is its exact inverse. Both must also work on ``meta``
    tensors: the loader derives each source's expected shape by exporting a meta parameter.
    """

    canonical: str
    sources: tuple[str, ...]
    to_canonical: Callable[[list[torch.Tensor]], torch.Tensor] = _only
    from_canonical: Callable[[torch.Tensor], list[torch.Tensor]] = _as_list


def rename(canonical: str, source: str) -> TensorRule:
    return TensorRule(canonical, (source,))


def fused_rows(canonical: str, sources: tuple[str, ...], sizes: tuple[int, ...]) -> TensorRule:
    """A canonical fused matrix stored in the checkpoint as separate row blocks."""
    return TensorRule(canonical, sources, concat_rows, lambda t: split_rows(t, sizes))


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
    ignored: tuple[str, ...] = field(default=(r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)rotary_pos_emb\.inv_freq$"))
    # The output matrix's name, which tied checkpoints sometimes store anyway (a copy of the embedding).
    tied_output: str = "lm_head.weight"
    # Where the config lives and how weights are written on export.
    config_file: str = "config.json"
    weights_format: str = "safetensors"  # or "torch" (consolidated.00.pth, Meta's own loader)

    def config_from_checkpoint(self, config: dict[str, Any]) -> ModelConfig:
        raise NotImplementedError

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        raise NotImplementedError

    def tensor_rules(self, config: ModelConfig) -> list[TensorRule]:
        raise NotImplementedError

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


def fused_rows_partial(canonical: str, parts: tuple[tuple[str | None, int], ...]) -> TensorRule:
    """A fused canonical vector whose row blocks exist in the checkpoint only for some parts.

    ``parts`` lists ``(source name or None, rows)`` in canonical order; missing parts load as
    zeros and are dropped on export (a q/k-only bias inside a fused ``[q | k | v]`` bias).
    """
    sizes = tuple(n for _, n in parts)
    present = tuple(name is not None for name, _ in parts)

    def to_canonical(found: list[torch.Tensor]) -> torch.Tensor:
        it = iter(found)
        like = found[0]
        blocks = [next(it) if here else like.new_zeros((n, *like.shape[1:]))
                  for here, n in zip(present, sizes)]
        return concat_rows(blocks)

    def from_canonical(t: torch.Tensor) -> list[torch.Tensor]:
        return [block for here, block in zip(present, split_rows(t, sizes)) if here]

    return TensorRule(canonical, tuple(name for name, _ in parts if name is not None), to_canonical, from_canonical)


def meta_style_rules(config: ModelConfig, prefix: str = "") -> list[TensorRule]:
    """Embedding, norms, SwiGLU MLP and output head under Meta's names (``tok_embeddings``,
    ``layers.{i}.attention_norm`` / ``ffn_norm`` / ``feed_forward.w1|w3|w2``, ``norm``, ``output``;
    docs/variants.md §3.2), shared by the Meta, InternLM2 (under ``model.``) and unilm layouts. The attention
    tensors are each layout's own."""
    inter = config.intermediate_size
    rules = [rename("embed.weight", prefix + "tok_embeddings.weight"), rename("final_norm.weight", prefix + "norm.weight")]
    if not config.tie_word_embeddings:
        rules.append(rename("lm_head.weight", "output.weight"))
    for i in range(config.num_layers):
        c, m = f"layers.{i}.", f"{prefix}layers.{i}."
        rules += [
            rename(c + "attn_norm.weight", m + "attention_norm.weight"),
            rename(c + "mlp_norm.weight", m + "ffn_norm.weight"),
            fused_rows(c + "mlp.gate_up.weight", (m + "feed_forward.w1.weight", m + "feed_forward.w3.weight"),
                       (inter, inter)),
            rename(c + "mlp.down.weight", m + "feed_forward.w2.weight"),
        ]
    return rules
