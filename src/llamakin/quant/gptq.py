"""GPTQ: rounding each projection so that its *output* on calibration text stays close, not its weights.

Round to nearest (:func:`~llamakin.quant.tensors.quantize_int8`, ``quantize_int4``) makes each
weight as close as it can be on its own. GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
https://arxiv.org/abs/2210.17323, Algorithm 1) instead minimises the layer's output error on
calibration activations ``X`` (rows = tokens): ``|| X W^T - X Q^T ||^2 = tr((W - Q) H (W - Q)^T)``
with ``H = 2 X^T X / n``. It quantizes the input columns one at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian (the Optimal
Brain Surgeon update), using the upper Cholesky factor ``U`` of ``H^-1``:

    err = (w_j - q_j) / U[j, j];    W[:, j+1:] -= err ⊗ U[j, j+1:]

in blocks of columns (the block's updates to later columns applied at once). Options of the paper
and of its reference code (IST-DASLab/gptq): damping ``H += damp * mean(diag H) * I``, columns with
no activation set to 0, and "act-order" (columns in decreasing ``diag H``). The grid is that of
the layouts here: int8 one scale per output row (fixed up front from the row's max), int4 min/max
per group of ``group_size`` columns (from the error-updated columns when the group starts, or from
the original weights under act-order, where groups are not contiguous in processing order).

:func:`gptq_model` runs it over a float model block by block on calibration token ids (each
block's Hessians measured on the outputs of the blocks already quantized, as the paper does),
then the output head on the final norm's output; :func:`llamakin.quant.model.quantize_model`
turns the returned weights into modules. Written from the paper; no code of the reference
implementations is used.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LlamakinError
from .tensors import Int4Weight, Int8Weight, check_group_size

DAMP = 0.01
BLOCK_COLUMNS = 128


class HessianAccumulator:
    """``H = 2 X^T X / n`` over every input row ``x`` seen (float32), updated as a running mean."""

    def __init__(self, columns: int, device: torch.device):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        new = self.rows + x.shape[0]
        self.H.mul_(self.rows / new)
        x = x * (2.0 / new) ** 0.5
        self.H.addmm_(x.t(), x)
        self.rows = new


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """``|| x W^T - x A^T ||^2`` summed over rows and outputs (float64): what GPTQ minimises."""
    x = x.reshape(-1, x.shape[-1]).double()
    return ((x @ (weight.double() - approx.double()).t()) ** 2).sum().item()


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; more damping if ``H`` is
    not positive definite in float32."""
    mean = H.diagonal().mean().item()
    for factor in (damp, damp * 10, damp * 100, 1.0):
        damped = H.clone()
        damped.diagonal().add_(factor * mean)
        L, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                return U
    raise LlamakinError(
        "the calibration activations give a Hessian that cannot be factored even with heavy "
        "damping; use more (or more varied) calibration text."
    )


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    kind: str,
    group_size: int = 32,
    damp: float = DAMP,
    act_order: bool = True,
) -> Int8Weight | Int4Weight:
    """GPTQ of one matrix ``weight [N, K]`` given ``hessian [K, K]`` (:class:`HessianAccumulator`):
    ``kind`` ``"int8"`` (per output row) or ``"int4"`` (groups of ``group_size`` columns)."""
    if kind not in ("int8", "int4"):
        raise LlamakinError(f"GPTQ quantizes to 'int8' or 'int4', not {kind!r}.")
    W = weight.detach().to(torch.float32).clone()
    N, K = W.shape
    if kind == "int4":
        check_group_size(group_size, K)
    H = hessian.to(device=W.device, dtype=torch.float32).clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0

    # the grid: int8 row scales fixed now; int4 group (scale, zero) now under act-order, else
    # when each group's first column comes up
    int8_scales = W.abs().amax(dim=1) / 127.0 if kind == "int8" else None
    groups = K // group_size if kind == "int4" else 0
    scales = torch.zeros(N, groups, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(N, groups, dtype=torch.float32, device=W.device)

    def set_group(g: int, columns: torch.Tensor) -> None:
        lo, hi = columns.amin(dim=1), columns.amax(dim=1)
        scales[:, g] = (hi - lo) / 15.0
        zeros[:, g] = lo + 8 * scales[:, g]

    order = torch.arange(K, device=W.device)
    if act_order:
        order = torch.argsort(H.diagonal(), descending=True)
        if kind == "int4":
            for g in range(groups):
                set_group(g, W[:, g * group_size : (g + 1) * group_size])
        W, H = W[:, order], H[order][:, order]
    U = _inverse_cholesky(H, damp)

    q = torch.empty(N, K, dtype=torch.int16, device=W.device)  # in processing order
    if kind == "int8":
        safe8 = torch.where(int8_scales > 0, int8_scales, torch.ones_like(int8_scales))

    def round_column(column: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer values, dequantized values) of one column, at processing position ``column``."""
        if kind == "int8":
            qi = torch.round(w / safe8).clamp_(-127, 127)
            return qi, qi * int8_scales
        g = int(order[column]) // group_size
        s, z = scales[:, g], zeros[:, g]
        qi = torch.round((w - z) / torch.where(s > 0, s, torch.ones_like(s)) + 8).clamp_(0, 15)
        qi = torch.where(s > 0, qi, torch.zeros_like(qi))
        return qi, (qi - 8) * s + z

    block = max(BLOCK_COLUMNS, group_size)  # a block holds whole groups
    for start in range(0, K, block):
        stop = min(start + block, K)
        W1 = W[:, start:stop].clone()
        U1 = U[start:stop, start:stop]
        errors = torch.empty_like(W1)
        for j in range(stop - start):
            column = start + j
            if kind == "int4" and not act_order and column % group_size == 0:
                set_group(column // group_size, W1[:, j : j + group_size])
            w = W1[:, j]
            qi, deq = round_column(column, w)
            q[:, column] = qi.to(torch.int16)
            err = (w - deq) / U1[j, j]
            W1[:, j:].sub_(err[:, None] * U1[j, j:][None, :])
            errors[:, j] = err
        W[:, stop:].sub_(errors @ U[start:stop, stop:])

    if act_order:
        q = q[:, torch.argsort(order)]
    if kind == "int8":
        return Int8Weight(q.to(torch.int8).contiguous(), int8_scales.contiguous())
    return Int4Weight(q.to(torch.uint8).contiguous(), scales, zeros, group_size)


class _Stop(Exception):
    """Raised by the first block's pre-hook: the calibration forward needs only its inputs."""


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    ids: torch.Tensor,
    mode: str,
    group_size: int = 32,
    head: str = "int8",
    damp: float = DAMP,
    act_order: bool = True,
    progress=None,
) -> dict[str, Int8Weight | Int4Weight]:
    """GPTQ weights of every projection of the float ``model`` (and the head unless ``head`` is
    ``"none"``), from calibration token ids ``ids [S, T]``: ``{module name: weight}`` for
    :func:`llamakin.quant.model.quantize_model` (``weights=``).

    Block by block: the block's inputs (the previous blocks' outputs with their weights already
    quantized), its projections' Hessians from one forward, GPTQ of each, the quantized values
    written back into the float model (so the next block sees them), its outputs from a second
    forward. A tied head is quantized from the embedding table without changing the table.
    ``progress``: called with a line per block."""
    from .model import HEAD, projection_names

    captured = {}

    def capture(module, args):
        captured["args"] = args
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(capture)
    try:
        model(ids.to(model.device))
    except _Stop:
        pass
    finally:
        handle.remove()
    x, rope, masks, _ = captured["args"]
    names = projection_names(model)
    weights: dict[str, Int8Weight | Int4Weight] = {}
    for index, block in enumerate(model.layers):
        prefix = f"layers.{index}."
        linears = {n: model.get_submodule(n) for n in names if n.startswith(prefix)}
        accumulators = {
            n: HessianAccumulator(m.in_features, m.weight.device) for n, m in linears.items()
        }
        hooks = [
            m.register_forward_hook(
                lambda module, inputs, output, acc=accumulators[n]: acc.add(inputs[0])
            )
            for n, m in linears.items()
        ]
        try:
            block(x, rope, masks, None)
        finally:
            for h in hooks:
                h.remove()
        for n, linear in linears.items():
            weights[n] = gptq_quantize(
                linear.weight, accumulators[n].H, mode, group_size, damp, act_order
            )
            linear.weight.copy_(weights[n].dequantize(linear.weight.dtype))
        del accumulators
        x = block(x, rope, masks, None)
        if progress is not None:
            progress(f"GPTQ: block {index + 1}/{len(model.layers)}")
    if head != "none":
        h = model.final_norm(x)
        acc = HessianAccumulator(h.shape[-1], h.device)
        acc.add(h)
        weights[HEAD] = gptq_quantize(model.output_weight, acc.H, head, group_size, damp, act_order)
    return weights


def calibration_ids(tokenizer, text: str, tokens: int, window: int = 512) -> torch.Tensor:
    """The first ``tokens`` tokens of ``text`` as rows of ``window`` tokens ``[tokens // window,
    window]`` (fewer if the text is shorter, at least one full window)."""
    ids = tokenizer.encode(text)
    window = min(window, tokens)
    rows = min(tokens, len(ids)) // window
    if rows == 0:
        raise LlamakinError(
            f"the calibration text has {len(ids)} tokens, fewer than one window of {window}; "
            "give a longer text (a few thousand tokens of ordinary prose)."
        )
    return torch.tensor(ids[: rows * window], dtype=torch.long).view(rows, window)
