"""Rows in one preallocated KV cache: admission, decode steps, retirement.

Row ``i`` of the cache belongs to ``rows[i]``; the active rows are always ``0 .. n-1``. Each row
stands at its own length, so rows admitted at different times share a step (continuous batching
in the server; one batch of prompts in :func:`~llamakin.generate`). Admission:

* prompts that start with a sequence in the :class:`~.prefix_cache.PrefixCache` get those keys and
  values copied into their row and prefill only the rest;
* the other prompts are prefilled together, left-padded (the padding is marked invalid in the
  cache, and positions count real tokens);
* rows with the same prompt (a request's ``n`` samples) are prefilled once: the first row's cache
  row is copied to the others, and each samples its first token from the same logits with its own
  generator.

A decode step feeds every row its last token, at its own slot and position, rounded up to a few
batch sizes and cache lengths so the traced step is reused (:mod:`llamakin.speed.decode_trace`). A
failure while sampling or detokenizing one row marks that row alone (``row.error``); a failure
of the shared step propagates to the caller. Finished, failed and cancelled rows are retired:
the last row moves into the hole, and a finished or cancelled row's keys/values go to the prefix
cache.
"""

from __future__ import annotations

import torch

from ..model.cache import KVCache
from ..model.positions import position_tracker
from ..speed.decode_trace import CACHE_BUCKET, Decoder
from .prefix_cache import PrefixCache, prefix_reuse_supported
from .rows import LinearPosition, PrefixLMPosition, Row


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, at most ``limit``."""
    return min(1 << (n - 1).bit_length(), limit)


class RowBatch:
    """Up to ``max_rows`` rows of up to ``max_len`` tokens each, over one KV cache.

    Decode steps reuse one :class:`~llamakin.speed.decode_trace.Decoder` while the batch bucket
    and cache length stay the same, and make a new one (which checks the weights stamp: changed
    weights are traced again) at every admission: weights changed between requests reach the next
    step after the next admission; a change made while rows are decoding, with no admission in
    between, reaches the traced step only then (eager decoding sees it at once).
    """

    def __init__(
        self,
        model,
        eos_token_ids,
        max_rows: int,
        max_len: int,
        prefix_cache: PrefixCache | None = None,
        select_adapters=None,
    ):
        self.model = model
        # called with each row's adapter (``Row.adapter``; padding rows 0) before every forward, in the
        # forward's row order: how per-row LoRA adapters reach the model (llamakin.lora.multi.select_rows)
        self.select_adapters = select_adapters or (lambda adapters: None)
        self.eos = set(eos_token_ids)
        self.max_rows, self.max_len = max_rows, max_len
        self.cache = KVCache(model.config, max_rows, max_len, model.dtype, model.device)
        self.prefix_cache = (
            prefix_cache
            if prefix_cache is not None and prefix_reuse_supported(model.config)
            else None
        )
        self.rows: list[Row] = []
        # the decode step's Decoder, kept while the batch bucket and cache length stay the same;
        # made again (checking the weights stamp, speed/decode_trace.py) on every admission
        self._decoder: tuple[tuple[int, int], Decoder] | None = None

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    # -- admission ------------------------------------------------------------------------------------
    def admit(self, rows: list[Row]) -> None:
        """Prefill ``rows`` into free cache rows and sample each one's first token. On an
        exception no row of ``rows`` stays admitted."""
        if len(rows) > self.free:
            raise ValueError(
                f"{len(rows)} rows do not fit: {self.free} of {self.max_rows} are free"
            )
        first = len(self.rows)
        self._decoder = None  # weights changed since the last admission are traced again
        try:
            self._admit(rows)
        except BaseException:
            del self.rows[first:]
            raise

    def _admit(self, rows: list[Row]) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.check_weights(self.model)
        leaders: dict[tuple, Row] = {}
        forks: list[tuple[Row, Row]] = []
        for row in rows:
            key = (tuple(row.prompt), row.adapter)
            if key in leaders:
                forks.append((row, leaders[key]))
            else:
                leaders[key] = row
        fresh, logits = [], {}
        for row in leaders.values():
            reuse = None
            if self.prefix_cache is not None:
                m, entry = self.prefix_cache.lookup(
                    row.prompt, row.adapter, limit=len(row.prompt) - 1
                )
                if entry is not None:
                    reuse = (m, entry)
            if reuse is None:
                fresh.append(row)
            else:
                logits[id(row)] = self._prefill_reusing(row, *reuse)
        if fresh:
            logits.update(self._prefill_together(fresh))
        for row, leader in forks:
            index = len(self.rows)
            self.cache.move_row(self.rows.index(leader), index, leader.length)
            self._reset_valid(index, leader.length)
            row.length, row.pad, row.reused = leader.length, leader.pad, leader.reused
            row.position = _copy_position(leader.position)
            self.rows.append(row)
            logits[id(row)] = logits[id(leader)]
        for row in rows:
            self._sample(row, logits[id(row)])

    def _reset_valid(self, index: int, start: int = 0) -> None:
        """Mark slots ``start ..`` of cache row ``index`` as real tokens (a previous occupant's
        padding must not hide this row's own tokens)."""
        self.cache.valid[index, start:] = True

    def _prefill_together(self, rows: list[Row]) -> dict[int, torch.Tensor]:
        """One left-padded prefill of ``rows`` into the next free cache rows: last logits per row."""
        device = self.model.device
        first, count = len(self.rows), len(rows)
        longest = max(len(r.prompt) for r in rows)
        ids = torch.zeros((count, longest), dtype=torch.long)
        mask = torch.zeros((count, longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, longest - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, longest - len(row.prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = bool((mask == 0).any())
        for i in range(count):
            self._reset_valid(first + i)
        tracker = position_tracker(self.model.config)
        positions, _ = tracker.prompt(ids, mask.bool() if padded else None)
        view = self.cache.view(slice(first, first + count), longest)
        for i, row in enumerate(rows):
            row.length, row.pad = longest, longest - len(row.prompt)
            row.position = (
                PrefixLMPosition(
                    tracker.rows[i].mask_position, tracker.rows[i].ctx, tracker.rows[i].length
                )
                if self.model.config.prefix_lm
                else LinearPosition(len(row.prompt))
            )
            self.rows.append(row)
        self.select_adapters([row.adapter for row in rows])
        logits = self.model(
            ids,
            attention_mask=mask if padded else None,
            position_ids=positions,
            cache=view,
            last_only=True,
        )[:, -1]
        return {id(row): logits[i] for i, row in enumerate(rows)}

    def _prefill_reusing(self, row: Row, reused: int, entry) -> torch.Tensor:
        """Copy ``reused`` slots of keys/values from ``entry``, prefill the rest of the prompt."""
        index = len(self.rows)
        self._reset_valid(index)
        for keys, values, stored_keys, stored_values in zip(
            self.cache.keys, self.cache.values, entry.keys, entry.values
        ):
            keys[index, :, :reused] = stored_keys[:, :reused]
            values[index, :, :reused] = stored_values[:, :reused]
        row.length, row.pad, row.reused = len(row.prompt), 0, reused
        row.position = LinearPosition(len(row.prompt))
        self.rows.append(row)
        view = self.cache.view(index, len(row.prompt))
        view.length = reused
        rest = torch.tensor([row.prompt[reused:]], device=self.model.device)
        self.select_adapters([row.adapter])
        return self.model(rest, cache=view, last_only=True)[0, -1]

    # -- decoding -------------------------------------------------------------------------------------
    def _sample(self, row: Row, logits: torch.Tensor) -> None:
        """Choose and take the row's next token; a failure ends this row alone."""
        try:
            row.accept(row.sampler.choose(logits, row.result.token_ids), self.eos)
        except Exception as e:  # noqa: BLE001 - NaN probabilities, a tokenizer that cannot decode, ...
            row.error = e

    def step(self) -> None:
        """One decode step of every active row (the caller retires finished rows first)."""
        n = len(self.rows)
        batch = bucket(n, self.max_rows)
        longest = max(r.length for r in self.rows) + 1
        length = min(-(-longest // CACHE_BUCKET) * CACHE_BUCKET, self.max_len)
        if self._decoder is None or self._decoder[0] != (batch, length):
            # a Decoder walks every weight for its stamp (~0.3-0.9 ms for SmolLM2-135M, ~8% of an
            # int4 step): once per shape between admissions, not once per step. It can run at most
            # as many steps as the view has slots left: a short run decodes eagerly (no recording)
            self._decoder = (
                (batch, length),
                Decoder(
                    self.model,
                    self.cache.view(slice(0, batch), length),
                    steps=length - longest + 1,
                ),
            )
        device = self.model.device
        pad = batch - n
        positions = [r.position.take() for r in self.rows]
        positions += [[[0], [0]] if self.model.config.prefix_lm else [0]] * pad
        tokens = torch.tensor([r.last_token for r in self.rows] + [0] * pad, device=device)[:, None]
        slots = torch.tensor([r.length for r in self.rows] + [0] * pad, device=device)
        self.select_adapters([r.adapter for r in self.rows] + [0] * pad)
        logits = self._decoder[1].step_rows(
            tokens, torch.tensor(positions, device=device), slots, span=longest
        )
        for index, row in enumerate(self.rows):
            row.length += 1
            row.fed.append(row.last_token)
            if not row.done:
                self._sample(row, logits[index])

    # -- retirement -----------------------------------------------------------------------------------
    def retire(self) -> list[Row]:
        """Remove every finished, failed or cancelled row (compacting the rest into rows
        ``0 .. n-1``); finished and cancelled rows hand out their held-back text and leave their
        keys/values to the prefix cache. Returns the removed rows."""
        removed, index = [], 0
        while index < len(self.rows):
            row = self.rows[index]
            if row.error is None and row.result.finish_reason is not None:
                try:
                    row.finish()
                except Exception as e:  # noqa: BLE001 - detokenizing the tail can fail, for this row alone
                    row.error = e
            if row.done or row.cancelled():
                if row.error is None:
                    self._remember(index, row)
                removed.append(row)
                self._remove(index)
            else:
                index += 1
        return removed

    def _remember(self, index: int, row: Row) -> None:
        if self.prefix_cache is None:
            return
        tokens = row.cached_tokens()
        start, end = row.pad, row.length
        if end - start != len(tokens):  # (cannot happen: every fed token wrote one slot)
            return
        self.prefix_cache.store(
            tokens,
            [k[index, :, start:end] for k in self.cache.keys],
            [v[index, :, start:end] for v in self.cache.values],
            row.adapter,
        )

    def _remove(self, index: int) -> None:
        last = len(self.rows) - 1
        if index != last:
            moved = self.rows[last]
            self.cache.move_row(last, index, moved.length)  # keys, values and per-row RoPE state
            self._reset_valid(index, moved.length)
            self.rows[index] = moved
        self.rows.pop()


def _copy_position(position):
    if isinstance(position, PrefixLMPosition):
        return PrefixLMPosition(position.mask_position, position.ctx, position.length)
    return LinearPosition(position.next_position)
