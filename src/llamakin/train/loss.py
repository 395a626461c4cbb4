"""The training loss: next-token cross-entropy with the output head fused in, over chunks of rows.

The loss of a batch is ``sum_i w_i * (logsumexp(z_i) - z_i[y_i])`` over positions ``i``, with
``z_i = W n_i / s`` the logits of position ``i`` (``n_i`` the final norm's output, ``W`` the output
matrix ``[vocab, hidden]``, ``s`` Granite's logits scaling, docs/variants.md §4) and ``w_i`` the
position's weight (the loop's mask of target tokens). The plain way, ``F.cross_entropy(model(x))``,
holds whole ``[tokens, vocab]`` tensors: the logits, their log-softmax (kept for backward) and, in
backward, the gradient of each; at a 49,152-token vocabulary that is 200 MB apiece for 1,024
tokens in float32, more memory than the rest of a LoRA step's activations.

:func:`token_loss_sum` never makes them whole. The final norm runs under ordinary autograd; then
:class:`ChunkedHeadLoss` takes the normed states a chunk of rows at a time: the chunk's logits,
their log-softmax (the loss terms, as ``F.cross_entropy`` computes them), and in the same forward
their gradient ``softmax - onehot(y)``, multiplied at once into the gradient with respect to the
normed states (and, when the head is trained, accumulated into the head weight's). Only those
two gradients are kept for backward, which scales them by the incoming gradient (the loss is a
scalar, so that is exact). Rows of weight zero (SFT's prompt tokens, padding) are skipped: they
add nothing to the loss or any gradient. Liger-Kernel's fused linear cross-entropy (Hsu et al.
2024, arXiv:2410.10989, section 3.2) does the same on GPUs with Triton kernels; this is plain torch.

The fused path needs the head to be a plain weight: the tied embedding's table or an untied
:class:`~llamakin.model.linear.Linear` without bias. A quantized head, a LoRA'd head or sharded
(FSDP) parameters take the plain path, which computes the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.linear import Linear
from ..speed import cpu_linear

#: elements of one chunk's logits (64 MB in float32): 341 rows at a 49,152-token vocabulary. Timed
#: against the plain path on this 2-core CPU (1,024 x 512 states, loaded machine): 170-row chunks
#: were 15 % slower with a trained head (each chunk adds into the whole [vocab, hidden] gradient),
#: 341-512 rows as fast as or faster than the plain path, trained or frozen head
CHUNK_ELEMENTS = 1 << 24


def widened(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (half-precision ones widened; float64 kept, for tests)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def fused_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The output matrix of ``model`` (a :class:`~llamakin.model.Transformer`) when the fused
    loss can use it (a plain floating-point weight, no bias, not sharded), else None."""
    if model.lm_head is None:
        if type(model.embed) is not nn.Embedding:  # a quantized table
            return None
        weight = model.embed.weight
    elif type(model.lm_head) in (Linear, nn.Linear) and model.lm_head.bias is None:
        weight = model.lm_head.weight
    else:  # quantized, LoRA'd, biased
        return None
    if not weight.is_floating_point() or type(weight.data) is not torch.Tensor:  # DTensor: FSDP
        return None
    return weight


def plain_loss_sum(
    logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The unfused loss: ``sum(mask * cross_entropy(logits, y))`` over whole ``[B, T, vocab]``
    logits (widened to float32 first)."""
    losses = F.cross_entropy(widened(logits).flatten(0, 1), y.flatten(), reduction="none")
    return losses.sum() if mask is None else (losses * mask.flatten()).sum()


class ChunkedHeadLoss(torch.autograd.Function):
    """``sum_i w_i * cross_entropy(hidden_i @ weight.T / scaling, y_i)`` with its gradients
    computed chunk by chunk in the forward (see the module docstring). ``hidden`` ``[N, H]``,
    ``weight`` ``[V, H]``, ``y`` ``[N]``, ``w`` ``[N]``; rows with ``w == 0`` are
    skipped by the caller."""

    @staticmethod
    def forward(ctx, hidden, weight, y, w, scaling, chunk_rows, want_hidden, want_weight):
        compute = hidden.dtype
        if torch.is_autocast_enabled(hidden.device.type):
            # the product in autocast's dtype, as the plain head's under autocast
            compute = torch.get_autocast_dtype(hidden.device.type)
        with torch.autocast(hidden.device.type, enabled=False):
            w_c = weight.to(compute)
            wide = torch.promote_types(compute, torch.float32)  # float32, or float64 (tests)
            total = torch.zeros((), dtype=wide, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if want_hidden else None
            grad_weight = (
                torch.zeros(weight.shape, dtype=wide, device=weight.device) if want_weight else None
            )
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h = hidden[rows].to(compute)
                logits = cpu_linear.linear(h, w_c).to(wide)
                if scaling != 1.0:
                    logits.div_(scaling)
                log_probs = torch.log_softmax(logits, -1)
                del logits
                target = y[rows, None]
                total -= (log_probs.gather(1, target).squeeze(1) * w[rows]).sum()
                if not (want_hidden or want_weight):
                    continue
                # d loss / d logits = w * (softmax - onehot(y)); the weight and 1/scaling are
                # applied to the [rows, hidden] side, never to the [rows, vocab] matrix
                grad = log_probs.exp_()
                grad.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=grad.dtype))
                grad = grad.to(compute)
                row_scale = (w[rows].to(wide) / scaling)[:, None]
                if want_hidden:
                    grad_hidden[rows] = (cpu_linear.linear(grad, w_c.t()).to(wide) * row_scale).to(
                        hidden.dtype
                    )
                if want_weight:
                    scaled = (h.to(wide) * row_scale).to(compute)
                    if compute == wide:
                        grad_weight.addmm_(grad.t(), scaled)
                    else:
                        grad_weight += (grad.t() @ scaled).to(wide)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def head_loss_sum(
    model: nn.Module,
    hidden: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``sum(mask * cross_entropy(model.head(hidden), y))`` for the last block's output ``hidden``
    ``[B, T, H]`` and targets ``y`` ``[B, T]``, fused and chunked when the head allows it
    (:func:`fused_head_weight`), else the plain way. ``mask`` (default all ones) weighs the
    positions. A float32 scalar."""
    weight = fused_head_weight(model)
    if weight is None:
        return plain_loss_sum(model.head(hidden), y, mask)
    normed = model.final_norm(hidden).flatten(0, 1)
    y = y.flatten()
    # F.cross_entropy's ignore_index (-100) counts as weight zero too
    wide = torch.promote_types(normed.dtype, torch.float32)
    w = (y != -100).to(wide) if mask is None else mask.flatten().to(wide) * (y != -100)
    keep = w != 0
    if not bool(keep.all()):
        normed, y, w = normed[keep], y[keep], w[keep]
    grad = torch.is_grad_enabled()
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    return ChunkedHeadLoss.apply(
        normed,
        weight,
        y,
        w,
        float(model.config.logits_scaling),
        chunk_rows,
        grad and normed.requires_grad,
        grad and weight.requires_grad,
    )


def token_loss_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    fused: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The summed next-token cross-entropy of ``model`` on inputs ``x`` and targets ``y``
    ``[B, T]``, each position weighed by ``mask`` (training and evaluation of
    :mod:`llamakin.train.loop`). ``model`` may be wrapped (DDP: ``.module``); ``fused=False``
    takes the plain ``F.cross_entropy(model(x))`` path (FSDP's sharded head)."""
    core = getattr(model, "module", model)
    if not fused or fused_head_weight(core) is None:
        return plain_loss_sum(model(x), y, mask)
    return head_loss_sum(core, model(x, hidden_only=True), y, mask, chunk_elements)


__all__ = [
    "CHUNK_ELEMENTS",
    "ChunkedHeadLoss",
    "fused_head_weight",
    "head_loss_sum",
    "plain_loss_sum",
    "token_loss_sum",
]
