"""The tensor rules every format is made of: one canonical parameter, the checkpoint tensors it
comes from, and the exact transform between them with its inverse (docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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
        blocks = [
            next(it) if here else like.new_zeros((n, *like.shape[1:]))
            for here, n in zip(present, sizes)
        ]
        return concat_rows(blocks)

    def from_canonical(t: torch.Tensor) -> list[torch.Tensor]:
        return [block for here, block in zip(present, split_rows(t, sizes)) if here]

    return TensorRule(
        canonical,
        tuple(name for name, _ in parts if name is not None),
        to_canonical,
        from_canonical,
    )
