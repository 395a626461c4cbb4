"""Several LoRA adapters on one base, one chosen per row of a batch (``llamakin serve --adapter NAME=DIR``).

The adapters stay unmerged. Each adapted projection becomes a :class:`MultiLoraLinear` holding,
for every adapter ``i`` (index 0 is "no adapter", all zeros), one ``A`` stack ``[n+1, R, in]``
and one ``B`` stack ``[n+1, out, R]``: the parts of a fused matrix (q/k/v, gate/up) side by side
in ``R`` (each part its own rank columns, padded with zeros to the largest rank any adapter
gives it) and each part's ``B`` in its own rows, with ``alpha / r`` folded in. A batch's rows
pick their adapter by index: ``y = base(x) + (x A[ids]^T) B[ids]^T``, two batched products, so
rows on different adapters share one forward. Zero padding adds exact zeros, so a row computes
``W x + scale B A x`` of its own adapter (the same function as that adapter merged alone, up to
float rounding order) and a row with index 0 computes the base alone, bit for bit.

The per-row indices are set before each forward with :func:`select_rows` (thread-local: the
server's engine thread and a request thread computing log-probabilities each see their own) and
are an *input* of the traced decode step (:mod:`llamakin.speed.decode_trace`), never a constant of it.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import LlamakinError
from ..model import Transformer
from .model import projection_parts
from .peft_format import adapter_weights

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


class AdapterSelection(threading.local):
    """The adapter index of each row of the next forward (``None``: no adapter for any row)."""

    ids: torch.Tensor | None = None


class MultiLoraLinear(nn.Module):
    """A frozen projection plus every loaded adapter's update, chosen per row (see the module doc)."""

    def __init__(
        self,
        base: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        selection: AdapterSelection,
    ):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("lora_A", lora_A)  # [n + 1, R, in], row 0 zeros
        self.register_buffer("lora_B", lora_B)  # [n + 1, out, R], alpha / r folded in
        self.selection = selection

    @property
    def weight(
        self,
    ) -> torch.Tensor:  # attention's partial-bias mask reads the base's device through it
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.base(x) if bias is None else self.base(x, bias)
        ids = self.selection.ids
        if ids is None:
            return y
        rows = x.reshape(ids.shape[0], -1, self.in_features)  # batch rows first, whatever the shape
        z = torch.bmm(rows, self.lora_A[ids].transpose(1, 2))
        return y + torch.bmm(z, self.lora_B[ids].transpose(1, 2)).view(y.shape)

    def extra_repr(self) -> str:
        return f"adapters={self.lora_A.shape[0] - 1}, rank columns={self.lora_A.shape[1]}"


def parse_adapter_options(values: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``--adapter`` values: plain directories (merged into the base) and ``NAME=DIR`` (served by name)."""
    plain, named = [], {}
    for value in values:
        name, sep, directory = value.partition("=")
        if sep and NAME.match(name) and directory:
            if name in named:
                raise LlamakinError(
                    f"--adapter {name}=... is given twice; give each adapter a different name."
                )
            named[name] = directory
        else:
            plain.append(value)
    if plain and named:
        raise LlamakinError(
            "--adapter DIR (merged into the model) and --adapter NAME=DIR (chosen per request) cannot "
            "be mixed; name every adapter as NAME=DIR."
        )
    if len(plain) > 1:
        raise LlamakinError(
            "several --adapter DIR were given but only one can be merged into the model; serve them "
            "side by side as --adapter NAME=DIR (llamakin serve)."
        )
    return plain, named


def attach_adapters(model: Transformer, adapters: dict[str, str | Path]) -> list[str]:
    """Load every PEFT adapter of ``adapters`` (name -> directory) onto ``model`` unmerged (in place);
    returns the names, whose indices for :func:`select_rows` are 1, 2, ... in this order."""
    if getattr(model, "adapter_selection", None) is not None:
        raise LlamakinError(
            "this model already serves adapters; load the base again to change them."
        )
    names = list(adapters)
    loaded = [adapter_weights(model, adapters[name]) for name in names]
    selection = AdapterSelection()
    dtype, device = model.dtype, model.device
    for path, parts in projection_parts(model):
        ranks = {
            part: max(
                (specs[path][0].get(part, 0) for specs, _, _ in loaded if path in specs), default=0
            )
            for part, _ in parts
        }
        if not any(ranks.values()):
            continue
        base = model.get_submodule(path)
        columns = sum(ranks.values())
        a_stack = torch.zeros(len(names) + 1, columns, base.in_features, dtype=torch.float32)
        b_stack = torch.zeros(len(names) + 1, base.out_features, columns, dtype=torch.float32)
        for index, (specs, weights, _) in enumerate(loaded, start=1):
            row = col = 0
            for part, rows in parts:
                if (path, part) in weights:
                    a, b = weights[(path, part)]
                    r, scale = a.shape[0], specs[path][1][part]
                    a_stack[index, col : col + r] = a.float()
                    b_stack[index, row : row + rows, col : col + r] = scale * b.float()
                row, col = row + rows, col + ranks[part]
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(
            parent,
            attr,
            MultiLoraLinear(base, a_stack.to(device, dtype), b_stack.to(device, dtype), selection),
        )
    model.adapter_selection = selection
    return names


def select_rows(model: nn.Module, ids: Sequence[int] | torch.Tensor | None) -> None:
    """The adapter index of each row of ``model``'s next forward (0: the base alone); nothing for a
    model without adapters. This is the hook the server's engine calls before every forward."""
    selection = getattr(model, "adapter_selection", None)
    if selection is None:
        return
    if ids is not None and not isinstance(ids, torch.Tensor):
        ids = torch.tensor(list(ids), dtype=torch.long, device=model.device)
    selection.ids = ids


def with_adapter(model: nn.Module, index: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with every row of the model's forwards on adapter ``index`` (in this thread)."""
    select_rows(model, [index])
    try:
        return fn(*args)
    finally:
        select_rows(model, None)


__all__ = [
    "AdapterSelection",
    "MultiLoraLinear",
    "attach_adapters",
    "parse_adapter_options",
    "select_rows",
    "with_adapter",
]
