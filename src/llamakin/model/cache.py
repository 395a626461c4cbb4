"""Static key/value cache (docs/variants.md §8.2, §8.3); the masks over it are in :mod:`.masks`."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import LlamakinError


class KVCache:
    """Preallocated keys and values, per layer ``[batch, kv_heads, max_len, head_dim]``.

    Keys are stored after RoPE and before the KV heads are repeated for their query group (the
    HF/torchchat convention, docs/variants.md §8.3), or before RoPE with ``rope_cached_keys`` (InternLM v1). All rows advance together: a batch of prompts of
    different lengths is left-padded, and ``valid`` marks which slots hold real tokens so padding
    is never attended to and positions count only real tokens.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if max_len <= 0 or batch_size <= 0:
            raise LlamakinError(
                f"a KV cache needs a positive batch size and length, got {batch_size} and {max_len}."
            )
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        # one tensor per layer: indexing a layer is then free, not a select on every step
        self.keys = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)
        ]
        self.values = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)
        ]
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # slots filled so far (the same for every row)
        self.padded = False  # True once any slot holds padding
        # Qwen v1's dynamic-NTK alpha per row, set when a row's sequence starts (docs/variants.md §5.1); a
        # tensor, so views share it and a traced decode step takes it as an input
        self.rope_alpha = torch.ones(batch_size, dtype=torch.float32, device=device)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def reset(self) -> None:
        """Forget everything (the buffers are reused)."""
        self.length = 0
        self.padded = False
        self.rope_alpha.fill_(1.0)
        self.valid.fill_(True)

    def reserve(self, new_tokens: int, attention_mask: torch.Tensor | None) -> None:
        """Check room for ``new_tokens`` more slots and record which of them are padding."""
        if self.length + new_tokens > self.max_len:
            raise LlamakinError(
                f"the KV cache holds {self.max_len} tokens but {self.length + new_tokens} are needed; "
                "create a larger cache or shorten the input."
            )
        if attention_mask is not None:
            new = attention_mask[:, -new_tokens:].to(torch.bool)
            self.valid[:, self.length : self.length + new_tokens] = new
            if not self.padded and not bool(new.all()):
                self.padded = True

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's keys/values of one layer; return all keys/values so far (views)."""
        end = self.length + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def view(self, rows: int | slice, length: int | None = None) -> "KVCache":
        """A cache sharing this one's memory: some rows (an int is one row) and the first ``length``
        slots. Writes through the view land in this cache."""
        rows = slice(rows, rows + 1) if isinstance(rows, int) else rows
        length = self.max_len if length is None else length
        view = object.__new__(KVCache)
        view.keys = [k[rows, :, :length] for k in self.keys]
        view.values = [v[rows, :, :length] for v in self.values]
        view.valid = self.valid[rows, :length]
        view.rope_alpha = self.rope_alpha[rows]
        view.max_len, view.length, view.padded = length, 0, False
        return view

    def move_row(self, source: int, destination: int, length: int) -> None:
        """Copy row ``source``'s first ``length`` slots and per-row state into row ``destination``."""
        for keys, values in zip(self.keys, self.values):
            keys[destination, :, :length] = keys[source, :, :length]
            values[destination, :, :length] = values[source, :, :length]
        self.valid[destination, :length] = self.valid[source, :length]
        self.rope_alpha[destination] = self.rope_alpha[source]


class SlotWriter:
    """A view of a :class:`KVCache` for one decode step: row b writes its new key/value at slot
    ``slots[b]`` (rows may be at different lengths, as in a server's continuous batch), and
    attention reads the first ``span`` slots.

    ``span`` (default: every slot) is the same for every row; a traced decode step takes it from
    the width of its ``key_valid`` input, so one trace serves every span (README, "Attention over
    the filled slots only").
    """

    def __init__(self, cache: KVCache, slots: torch.Tensor, span: int | None = None):
        self.cache, self.slots = cache, slots
        self.span = cache.max_len if span is None else span
        self.rows = torch.arange(slots.shape[0], device=slots.device)

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if self.slots.shape[0] == 1:
            # one row: a copy along the slot axis, one kernel without advanced indexing (2x
            # cheaper per write than index_put_ on a 2-core AVX2 EPYC, README "Cutting the rest of
            # the step"; any strides, so views of a larger cache work too)
            keys.index_copy_(2, self.slots, k)
            values.index_copy_(2, self.slots, v)
        else:
            keys[self.rows, :, self.slots] = k[:, :, 0]
            values[self.rows, :, self.slots] = v[:, :, 0]
        return keys[:, :, : self.span], values[:, :, : self.span]
