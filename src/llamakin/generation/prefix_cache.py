"""Keys and values of earlier sequences, reused by a later prompt that starts with the same tokens.

A multi-turn chat sends the whole conversation again with every turn, and many requests share a
system prompt; without this every turn recomputes keys and values it already computed. With
causal attention the keys/values of the first ``m`` tokens depend only on those tokens, so those of
any stored sequence that shares the prompt's first ``m`` tokens are exactly the ones a full prefill
would compute (up to float rounding of differently shaped matrix products, ~1e-6 in float32): they
are copied into the row's cache and only the rest of the prompt is prefilled. At least the last
prompt token is always computed, since its logits choose the first new token.

Memory is bounded: ``budget_bytes`` for all entries, least recently used out. An entry that is a
prefix of a newly stored sequence is dropped (the longer one serves every prompt it served).
Entries are keyed by the row's adapter id too, and forgotten when the model's weights change.

Not exact, so off (:func:`prefix_reuse_supported`): Qwen v1's dynamic NTK (its alpha depends on the
whole prompt's length, and the cached keys were rotated with it), dynamic NTK scaling (past the
context the RoPE base grows with the length, so the hidden states behind the stored keys depend on
how long the sequence was when they were computed) and ChatGLM-6B's prefix LM (the prompt attends
bidirectionally, so early keys depend on later prompt tokens).
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch


def prefix_reuse_supported(config) -> bool:
    """Whether reused keys/values equal recomputed ones for this model (see the module doc)."""
    return not config.prefix_lm and config.rope_scaling.type not in ("qwen_dynamic", "dynamic")


def _weights_stamp(model) -> tuple:
    """Changes when a parameter or buffer is replaced or modified in place (an inference tensor,
    which cannot be modified outside inference mode, counts by identity)."""
    return tuple(
        (id(t), 0 if t.is_inference() else t._version)
        for t in itertools.chain(model.parameters(), model.buffers())
    )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer [kv_heads, n, head_dim]
    values: list[torch.Tensor]
    nbytes: int


class PrefixCache:
    """Stored keys/values by token sequence, at most ``budget_bytes`` in all (LRU)."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError("the prefix cache budget must be 0 (off) or a number of bytes")
        self.budget_bytes = budget_bytes
        self._entries: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self.bytes = 0
        self.hits = self.misses = self.reused_tokens = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def check_weights(self, model) -> None:
        """Forget everything if the model's weights changed since the entries were computed."""
        stamp = _weights_stamp(model)
        if stamp != self._stamp:
            self.clear()
            self._stamp = stamp

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def lookup(
        self, tokens: Sequence[int], adapter: Any = None, limit: int | None = None
    ) -> tuple[int, _Entry | None]:
        """The longest stored prefix of ``tokens`` (at most ``limit`` tokens): ``(m, entry)``, whose
        first ``m`` slots hold those tokens' keys/values; ``(0, None)`` when nothing matches."""
        best, found = 0, None
        with self._lock:
            for (owner, _), entry in self._entries.items():
                if owner != adapter or entry.tokens[0] != tokens[0]:
                    continue
                m = common_prefix(entry.tokens, tokens)
                if m > best:
                    best, found = m, entry
            if limit is not None:
                best = min(best, limit)
            if found is None or best == 0:
                self.misses += 1
                return 0, None
            self._entries.move_to_end((adapter, found.tokens))
            self.hits += 1
            self.reused_tokens += best
            return best, found

    def store(
        self,
        tokens: Sequence[int],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        adapter: Any = None,
    ) -> bool:
        """Keep copies of ``keys``/``values`` (per layer ``[kv_heads, len(tokens), head_dim]``) for
        ``tokens``; False when they alone exceed the budget."""
        tokens = tuple(tokens)
        nbytes = sum(t.numel() * t.element_size() for t in itertools.chain(keys, values))
        if not tokens or nbytes > self.budget_bytes:
            return False
        entry = _Entry(tokens, [k.clone() for k in keys], [v.clone() for v in values], nbytes)
        with self._lock:
            for key in [
                k
                for k, e in self._entries.items()
                if k[0] == adapter
                and len(e.tokens) <= len(tokens)
                and tokens[: len(e.tokens)] == e.tokens
            ]:
                self.bytes -= self._entries.pop(key).nbytes  # served by the new, longer entry
            self._entries[(adapter, tokens)] = entry
            self.bytes += nbytes
            while self.bytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
        return True

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "budget_bytes": self.budget_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "reused_tokens": self.reused_tokens,
            "evictions": self.evictions,
        }
