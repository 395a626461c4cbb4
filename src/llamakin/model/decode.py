"""The decoding step, run as a TorchScript trace when that is possible.

A decode step is ~40 small tensor operations per layer. On a 2-core CPU the Python around them
costs about as much as the arithmetic, so :class:`Decoder` records
:meth:`Transformer.decode_step` once per (batch size, cache length, dtype, device) with
``torch.jit.trace`` and replays it (SmolLM2-135M, float32: 15 -> 20 tok/s, bit-identical logits,
1.3 s to trace). Every shape in ``decode_step`` is static and its only state is the KV cache,
mutated in place, so a trace is exact: everything a step reads that can change between
generations is an input of the trace (the cache's tensors, including Qwen v1's per-row NTK alpha
fixed at prefill), never a constant recorded while tracing. The trace is then frozen (``torch.jit.freeze``: weights
become constants, the graph is simplified; another 6%, still bit-identical). Because frozen
constants would not follow later changes to the weights, a trace is keyed by a stamp of every
parameter and buffer (identity and in-place version counter): training or loading new weights
between generations retraces. Models whose RoPE frequencies depend on the current length
(``dynamic`` NTK: a base that grows with every step) run the same step eagerly. ``LLAMAKIN_TRACE=0`` turns tracing off.
"""

from __future__ import annotations

import itertools
import os
import warnings
import weakref

import torch
from torch import nn

from .cache import KVCache

CACHE_BUCKET = 256  # cache lengths are rounded up to this, so traces are shared between requests


def cache_length_for(needed: int, context: int) -> int:
    """The KV cache length to allocate for ``needed`` slots (rounded up, capped at the context)."""
    return min(-(-needed // CACHE_BUCKET) * CACHE_BUCKET, context)


class _Step(nn.Module):
    """``decode_step`` with the cache's tensors as explicit inputs, which tracing requires."""

    def __init__(self, model, cache: KVCache):
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, tokens, positions, slot, key_valid, keys: list[torch.Tensor], values: list[torch.Tensor],
                rope_alpha: torch.Tensor):
        self.cache.keys, self.cache.values, self.cache.rope_alpha = keys, values, rope_alpha
        return self.model.decode_step(tokens, positions, slot, key_valid, self.cache)


_TRACES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _traceable(model) -> bool:
    if os.environ.get("LLAMAKIN_TRACE", "1") == "0":
        return False
    return model.config.rope_scaling.type != "dynamic"


def _weights_stamp(model: nn.Module) -> tuple:
    """Changes when any parameter or buffer is replaced or modified in place."""
    return tuple((id(t), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


class Decoder:
    """Runs decode steps of ``model`` on ``cache``: ``step(tokens [B, 1], positions [B, 1]) -> logits [B, V]``."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        self._graph = self._trace() if _traceable(model) else None

    def _trace(self):
        cache = self.cache
        key = (cache.batch_size, cache.max_len, cache.keys[0].dtype, cache.keys[0].device, self.model.training)
        graphs = _TRACES.setdefault(self.model, {})
        stamp = _weights_stamp(self.model)
        if key not in graphs or graphs[key][0] != stamp:
            B = cache.batch_size
            device = cache.keys[0].device
            scratch = KVCache(self.model.config, B, cache.max_len, cache.keys[0].dtype, device)
            position_shape = (B, 2, 1) if self.model.config.rope_layout == "glm2d" else (B, 1)
            example = (torch.zeros(B, 1, dtype=torch.long, device=device),
                       torch.zeros(position_shape, dtype=torch.long, device=device),
                       torch.zeros(B, dtype=torch.long, device=device), scratch.valid, scratch.keys, scratch.values,
                       scratch.rope_alpha)
            training = self.model.training
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(_Step(self.model, scratch), example, check_trace=False)
                graphs[key] = (stamp, torch.jit.freeze(traced.eval()))
            self.model.train(training)  # freezing needs eval mode; the model keeps its own
        return graphs[key][1]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """All rows at the cache's current length (one generation's batch); advances the cache."""
        cache = self.cache
        if cache.length >= cache.max_len:
            raise RuntimeError("decode step past the end of the KV cache")
        slots = torch.full((tokens.shape[0],), cache.length, device=tokens.device)
        logits = self.step_rows(tokens, positions, slots)
        cache.advance(1)
        return logits

    def step_rows(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Rows at their own lengths: row b writes slot ``slots[b]``; the caller tracks lengths."""
        cache = self.cache
        if self._graph is not None:
            return self._graph(tokens, positions, slots, cache.valid, cache.keys, cache.values, cache.rope_alpha)
        return self.model.decode_step(tokens, positions, slots, cache.valid, cache)
