"""Continuous batching: one decode loop, in its own thread, shared by every request.

Requests wait in a bounded queue. Between two decode steps the loop admits waiting requests
into free rows of one preallocated KV cache (each is prefilled on its own, straight into its
row), drops finished and cancelled ones, and moves the last row into any hole so the active rows
are always ``0 .. n-1``. A step decodes those rows together, each at its own length (every row
writes its own cache slot), rounded up to a few batch sizes and cache lengths so the traced step
is reused. Text reaches each request's asyncio queue as it is produced.

A request can fail only itself: an exception while prefilling, sampling or detokenizing one row
(NaN probabilities, a tokenizer that cannot decode an id, ...) ends that request with an
``("error", message)`` event and frees its row, while every other row goes on. Only a failure of
the shared decode step, which computes all rows at once, ends every running request.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LlamakinError
from ..generate import RowResult, SamplingParams, TextStream, next_tokens
from ..lora.multi import select_rows
from ..model import decode
from ..model.cache import KVCache
from ..model.decode import CACHE_BUCKET, Decoder
from ..tokenizer import Tokenizer


class QueueFull(LlamakinError):
    """The waiting queue is at its bound: the client should retry later."""


@dataclass
class Request:
    """One generation: what to generate, and where its events go.

    Events put on ``events``: ``("text", piece)`` as text is produced, then ``("done", RowResult)``
    or ``("error", message)``.
    """

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    adapter: int = 0  # the LoRA adapter of this request (llamakin.lora.multi); 0: the base model
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)  # for the latency metrics
    first_token_at: float | None = None
    last_token_at: float | None = None

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the server's event loop is closed: nobody is listening any more
            pass


@dataclass
class _Row:
    request: Request
    stream: TextStream
    result: RowResult
    length: int  # cache slots filled
    last_token: int
    generator: torch.Generator | None
    seen: torch.Tensor | None  # [V] tokens of prompt and output (repetition penalty)
    counts: torch.Tensor | None  # [V] generated-token counts (frequency/presence penalties)
    error: str | None = None  # set when this row failed; it is retired with an error event


def _bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, at most ``limit``."""
    return min(1 << (n - 1).bit_length(), limit)


class Engine:
    """Owns the model, the tokenizer and the shared KV cache; serves :class:`Request` objects."""

    def __init__(self, model, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None):
        if model.config.prefix_lm:
            raise LlamakinError("prefix-LM models (ChatGLM-6B) are not served yet; use llamakin.generate.")
        if max_batch < 1 or max_queue < 1:
            raise LlamakinError("--max-batch and --max-queue must be at least 1.")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(context or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.cache = KVCache(model.config, max_batch, self.context, model.dtype, model.device)
        self.rows: list[_Row] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.stopping = False
        self.generated_tokens = 0
        self.metrics = None  # a ServerMetrics, told of every sampled token
        self.thread = threading.Thread(target=self._loop, name="llamakin-engine", daemon=True)
        self.thread.start()

    # -- called from the server's event loop ---------------------------------------------------------
    def submit(self, request: Request) -> None:
        if len(request.prompt_ids) + request.params.max_new_tokens > self.context:
            raise LlamakinError(
                f"the prompt has {len(request.prompt_ids)} tokens and max_tokens is {request.params.max_new_tokens}, "
                f"together more than this server's context of {self.context} tokens; shorten the prompt or lower max_tokens."
            )
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are already waiting; retry shortly.")
            self.waiting.append(request)
        self.wakeup.set()

    def status(self) -> dict[str, int]:
        return {"running": len(self.rows), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "context": self.context, "generated_tokens": self.generated_tokens,
                "decode_traces": len(decode.TRACES), "decode_traces_recorded": decode.TRACES.traced}

    def stop(self) -> None:
        self.stopping = True
        self.wakeup.set()
        self.thread.join(timeout=10)

    # -- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self.stopping:
                try:
                    self._admit()
                    self._retire()  # finished at prefill, or cancelled while waiting for a step
                    if not self.rows:
                        self.wakeup.wait(timeout=0.5)
                        self.wakeup.clear()
                        continue
                    self._step()
                except Exception as e:  # noqa: BLE001 - the shared step failed: every running row is lost
                    for row in self.rows:
                        row.request.emit("error", f"generation failed: {e}")
                    self.rows = []

    def _admit(self) -> None:
        while len(self.rows) < self.max_batch:
            with self.lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled.is_set():
                continue
            try:
                self._prefill(request)
            except Exception as e:  # noqa: BLE001 - this request alone fails
                if self.rows and self.rows[-1].request is request:
                    self.rows.pop()
                request.emit("error", _failure(e))

    def _prefill(self, request: Request) -> None:
        index = len(self.rows)
        params = request.params
        view = self.cache.view(index)
        ids = torch.tensor([request.prompt_ids], device=self.model.device)
        select_rows(self.model, [request.adapter])  # the adapter hook (no-op without adapters)
        logits = self.model(ids, cache=view, last_only=True)[:, -1]
        vocab = self.model.config.vocab_size
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(params.seed if params.seed is not None else int(torch.seed() % 2**63))
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=self.model.device)
            seen[ids[0]] = True
        counts = torch.zeros(vocab, device=self.model.device) if (params.frequency_penalty or params.presence_penalty) else None
        row = _Row(request, TextStream(self.tokenizer, params.stop), RowResult(), len(request.prompt_ids), -1,
                   generator, seen, counts)
        self.rows.append(row)
        self._accept(index, logits[0])

    def _accept(self, index: int, logits: torch.Tensor) -> None:
        """Sample row ``index``'s next token; a failure ends this row alone (see the module doc)."""
        row = self.rows[index]
        try:
            self._sample(row, logits)
        except Exception as e:  # noqa: BLE001
            row.error = _failure(e)

    def _sample(self, row: _Row, logits: torch.Tensor) -> None:
        """Sample the row's next token from its logits; emit text; finish the row if done."""
        params = row.request.params
        token = int(next_tokens(logits[None], params, None if row.seen is None else row.seen[None], row.generator,
                                None if row.counts is None else row.counts[None])[0])
        if row.seen is not None:
            row.seen[token] = True
        if row.counts is not None:
            row.counts[token] += 1
        if self.metrics is not None:
            self.metrics.token(row.request)
        row.last_token = token
        result = row.result
        if not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            result.finish_reason = "stop"
        else:
            result.token_ids.append(token)
            self.generated_tokens += 1
            piece = row.stream.push(token)
            if piece:
                result.text += piece
                row.request.emit("text", piece)
            if row.stream.stopped:
                result.finish_reason = "stop"
            elif len(result.token_ids) >= params.max_new_tokens:
                result.finish_reason = "length"

    def _step(self) -> None:
        n = len(self.rows)
        batch = _bucket(n, self.max_batch)
        longest = max(r.length for r in self.rows) + 1
        length = min(-(-longest // CACHE_BUCKET) * CACHE_BUCKET, self.context)
        view = self.cache.view(slice(0, batch), length)
        device = self.model.device
        pad = batch - n
        tokens = torch.tensor([r.last_token for r in self.rows] + [0] * pad, device=device)[:, None]
        lengths = torch.tensor([r.length for r in self.rows] + [0] * pad, device=device)
        select_rows(self.model, [r.request.adapter for r in self.rows] + [0] * pad)  # the adapter hook, per row
        logits = Decoder(self.model, view).step_rows(tokens, lengths[:, None], lengths)
        for index, row in enumerate(self.rows):
            row.length += 1
            if row.result.finish_reason is None and row.error is None:
                self._accept(index, logits[index])
        self._retire()

    def _retire(self) -> None:
        """Finish every row that is done and compact the rest into rows ``0 .. n-1``."""
        index = 0
        while index < len(self.rows):
            row = self.rows[index]
            done = row.result.finish_reason is not None
            if row.error is not None:
                row.request.emit("error", row.error)
                self._remove(index)
            elif done or row.request.cancelled.is_set():
                if done:
                    self._finish(row)
                self._remove(index)
            else:
                index += 1

    @staticmethod
    def _finish(row: _Row) -> None:
        """Hand out the text held back at the end (detokenizing it can fail, for this row alone)."""
        try:
            tail = row.stream.finish()
        except Exception as e:  # noqa: BLE001
            row.request.emit("error", _failure(e))
            return
        if tail:
            row.result.text += tail
            row.request.emit("text", tail)
        row.request.emit("done", row.result)

    def _remove(self, index: int) -> None:
        last = len(self.rows) - 1
        if index != last:
            moved = self.rows[last]
            self.cache.move_row(last, index, moved.length)  # keys, values and per-row RoPE state
            self.rows[index] = moved
        self.rows.pop()


def _failure(error: Exception) -> str:
    return f"generation failed for this request ({type(error).__name__}: {error}); other requests were not affected."


def new_request(prompt_ids: list[int], params: SamplingParams, adapter: int = 0) -> Request:
    """A request bound to the running event loop (``adapter``: the index of its LoRA adapter)."""
    return Request(prompt_ids, params, asyncio.get_running_loop(), asyncio.Queue(), adapter=adapter)


__all__ = ["Engine", "QueueFull", "Request", "new_request"]
