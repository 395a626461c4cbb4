"""A GGUF Q8_0 embedding table looked up in place, in the memory-mapped file.

The token embedding is the largest table of a small model (SmolLM2-135M: 49,152 rows of 576,
a 30 MB Q8_0 table), and a generation reads a few of its rows per step. :class:`MappedQ8Embedding`
keeps no copy: its only tensor is the file's own mapping of the table's blocks
(:meth:`llamakin.io.gguf.GGUFFile.mapped`), so only the pages of rows looked up become resident
(a 576-wide row is 612 bytes, one or two 4 KiB pages, once the kernel is told that lookups are
scattered: :func:`llamakin.resident.advise_random`) and they stay in the OS page cache, shared.

A lookup decodes the rows it reads with :class:`~llamakin.quant.linear.Int8Embedding`'s own code
(only where the rows come from differs: ``_groups``), exactly as for the table decoded up front
(:func:`llamakin.quant.gguf_blocks.decode_q8_0`): ``q`` int8 and ``d`` fp16 -> float32,
``w = q * d`` in float32, then the model's dtype. The values are therefore
identical (tested), and so is everything built from the table (the tied head's int8 rows, files).

Q8_0's block (``ggml-common.h``): ``fp16 d; int8 qs[32]``, 34 bytes, 32 weights of one row.
"""

from __future__ import annotations

import torch

from .. import resident
from .gguf_blocks import BLOCK
from .linear import Int8Embedding

Q8_0_BYTES = 2 + BLOCK


class MappedQ8Embedding(Int8Embedding):
    """An :class:`Int8Embedding` (groups of 32) whose table is the file's Q8_0 rows,
    ``uint8 [V, D / 32 * 34]``, read-only. It keeps two strided views of those bytes (made once,
    outside any trace: TorchScript cannot trace a dtype view): ``q_blocks`` int8
    ``[V, D / 32, 32]`` and ``d_blocks`` float16 ``[V, D / 32]``. ``qweight``/``scales`` decode
    the whole table on request (files)."""

    def __init__(self, rows: torch.Tensor, dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] % Q8_0_BYTES:
            raise ValueError(f"not Q8_0 rows: {rows.dtype} {tuple(rows.shape)}")
        count, groups = rows.shape[0], rows.shape[1] // Q8_0_BYTES
        self.num_embeddings, self.embedding_dim = count, groups * BLOCK
        self.group_size = BLOCK
        self.dtype = dtype
        blocks = rows.view(torch.int8).view(count, groups, Q8_0_BYTES)
        self.register_buffer("q_blocks", blocks[..., 2:])
        # fp16 d at the start of each 34-byte block: even offsets (GGUF aligns tensor data to 32)
        halves = rows.view(torch.float16).view(count, groups, Q8_0_BYTES // 2)
        self.register_buffer("d_blocks", halves[..., 0])
        resident.advise_random(*resident.mapped_span(rows))

    def __getattr__(self, name: str):
        """``qweight`` and ``scales``, as :class:`Int8Embedding` has them, decoded on request. Not
        properties: ``torch.jit.trace`` reads every attribute ``dir()`` lists
        (``torch._jit_internal.module_has_exports``), which would touch the whole table."""
        if name == "qweight":
            return self.q_blocks.reshape(self.num_embeddings, self.embedding_dim)
        if name == "scales":
            return self.d_blocks.to(torch.float32)
        return super().__getattr__(name)

    def _groups(self, rows: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        # only the rows read are copied out of the mapping
        return self.q_blocks[rows], self.d_blocks[rows].to(torch.float32)

    def _row_page_dropper(self):
        """Drops the pages of rows read by :meth:`to_int8_rows` as it goes, so the table is never
        resident whole (the default model's load peak: 402 -> 372 MB); the mapping is checked
        once per pass (:func:`llamakin.resident.page_dropper`)."""
        address, length = resident.mapped_span(self.q_blocks)
        drop = resident.page_dropper(address, length)
        if drop is None:
            return None
        row_bytes, count = length // self.num_embeddings, self.num_embeddings
        return lambda start, stop: drop(start * row_bytes, min(stop, count) * row_bytes)
