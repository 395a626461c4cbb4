"""A checkpoint format's tensor names, declared as a table (docs/architecture.md, "Adding a family").

Each format maps llamakin's canonical parameter names to its own with one table. Keys are
canonical names, ``{i}`` standing for the layer index (``"layers.{i}.attn.o_proj.weight"``);
values say where the parameter lives in the checkpoint:

* a string: a plain rename (``"model.layers.{i}.self_attn.o_proj.weight"``);
* a tuple of strings: a fused canonical matrix stored as separate row blocks, in canonical order
  (``[q | k | v]`` for ``attn.qkv``, ``[gate | up]`` for ``mlp.gate_up``); a block the model does
  not have (a q/k-only bias inside the fused ``[q | k | v]`` bias) is absent from the checkpoint;
* a :class:`Transformed`: source tensors joined by an exact transform with its inverse (a RoPE
  row permutation, per-head or per-group interleaving), built by a function of the config.

:func:`rules_from_table` turns a table into the :class:`~.base.TensorRule` list the loader and the
exporters use, for exactly the parameters a model with the given config has (which biases, norms
and heads exist is the model's business, so a table lists every tensor the format can hold and
needs no conditions). A parameter the table does not name is a format that cannot hold the model.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Union

import torch

from ..config import ModelConfig
from ..errors import UnsupportedError
from ..model import Transformer
from .rules import TensorRule, fused_rows, fused_rows_partial, rename

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Transformed:
    """Checkpoint tensors ``sources`` (templates with ``{i}``) joined into one canonical parameter by
    ``make(canonical, sources, config)``, which returns the :class:`~.base.TensorRule` with the
    exact transform and its inverse."""

    sources: tuple[str, ...]
    make: Callable[[str, tuple[str, ...], ModelConfig], TensorRule]


Entry = Union[str, tuple[str, ...], Transformed]


@functools.lru_cache(maxsize=64)
def canonical_parameters(config: ModelConfig) -> tuple[str, ...]:
    """The names of the parameters a model with ``config`` has (a tied output head is the embedding,
    so it is not listed twice), from a model built on the ``meta`` device (no memory)."""
    with torch.device("meta"):
        return tuple(name for name, _ in Transformer(config).named_parameters())


def block_sizes(name: str, config: ModelConfig) -> tuple[int, ...]:
    """Rows of each block of a fused canonical parameter (its name inside a layer)."""
    if name.startswith("attn.qkv."):
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return (q, kv, kv)
    if name.startswith("mlp.gate_up."):
        return (config.intermediate_size, config.intermediate_size)
    raise AssertionError(f"{name} is not a fused parameter; a table gives it one checkpoint name")


def blocks_present(name: str, config: ModelConfig) -> tuple[bool, ...]:
    """Which blocks of a fused canonical parameter exist (q, k, v biases are independent knobs)."""
    if name == "attn.qkv.bias":
        return (config.q_bias, config.k_bias, config.v_bias)
    return (True,) * len(block_sizes(name, config))


def rules_from_table(
    table: Mapping[str, Entry], config: ModelConfig, format_name: str
) -> list[TensorRule]:
    """The tensor rules of every parameter of a ``config`` model, in the model's parameter order."""
    rules = []
    for canonical in canonical_parameters(config):
        layer = _LAYER.match(canonical)
        key, index, inner = (
            (f"layers.{{i}}.{layer[2]}", layer[1], layer[2])
            if layer
            else (canonical, None, canonical)
        )
        entry = table.get(key)
        if entry is None:
            raise UnsupportedError(
                f"the {format_name} format has no tensor for llamakin's {key}; save this model in "
                "another format (the llamakin format holds every configuration)."
            )
        if isinstance(entry, str):
            rules.append(rename(canonical, entry.format(i=index)))
        elif isinstance(entry, tuple):
            sources = tuple(s.format(i=index) for s in entry)
            sizes, present = block_sizes(inner, config), blocks_present(inner, config)
            rules.append(
                fused_rows(canonical, sources, sizes)
                if all(present)
                else fused_rows_partial(
                    canonical,
                    tuple((s if here else None, n) for s, here, n in zip(sources, present, sizes)),
                )
            )
        else:
            rules.append(
                entry.make(canonical, tuple(s.format(i=index) for s in entry.sources), config)
            )
    return rules


def meta_style_table(prefix: str = "") -> dict[str, Entry]:
    """Embedding, norms, SwiGLU MLP and output head under Meta's names (``tok_embeddings``,
    ``layers.{i}.attention_norm`` / ``ffn_norm`` / ``feed_forward.w1|w3|w2``, ``norm``, ``output``;
    docs/variants.md §3.2), shared by the Meta, InternLM2 (under ``model.``) and unilm layouts. The
    attention tensors are each layout's own."""
    m = prefix + "layers.{i}."
    return {
        "embed.weight": prefix + "tok_embeddings.weight",
        "final_norm.weight": prefix + "norm.weight",
        "lm_head.weight": "output.weight",
        "layers.{i}.attn_norm.weight": m + "attention_norm.weight",
        "layers.{i}.mlp_norm.weight": m + "ffn_norm.weight",
        "layers.{i}.mlp.gate_up.weight": (
            m + "feed_forward.w1.weight",
            m + "feed_forward.w3.weight",
        ),
        "layers.{i}.mlp.down.weight": m + "feed_forward.w2.weight",
    }


def one_source(
    to_canonical: Callable[[torch.Tensor, ModelConfig], torch.Tensor],
    from_canonical: Callable[[torch.Tensor, ModelConfig], torch.Tensor],
) -> Callable[..., TensorRule]:
    """A :class:`Transformed` maker for one checkpoint tensor reordered into one canonical parameter."""

    def make(canonical: str, sources: tuple[str, ...], config: ModelConfig) -> TensorRule:
        return TensorRule(
            canonical,
            sources,
            lambda parts: to_canonical(parts[0], config),
            lambda t: [from_canonical(t, config)],
        )

    return make
