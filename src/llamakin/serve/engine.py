"""Continuous batching: one decode loop, in its own thread, shared by every request.

Requests wait in a bounded queue. Between two decode steps the loop admits waiting requests
into free rows of the generation core's :class:`~llamakin.generation.RowBatch` (the same rows,
sampling, stopping and streaming as :func:`llamakin.generate`), which prefills them (reusing
cached keys/values of earlier requests that started the same way, see
:mod:`llamakin.generation.prefix_cache`), drops finished and cancelled ones, and decodes all rows
together, each at its own length. A request with ``n > 1`` samples is admitted as ``n`` rows
that share one prefill. Text reaches each request's asyncio queue as it is produced.

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
from typing import Any, Callable

import torch

from ..errors import LlamakinError
from ..generation import PrefixCache, Row, RowBatch, RowSampler, SamplingParams, TextStream
from ..generation.sampling import LogitsProcessor
from ..lora.multi import select_rows
from ..speed import decode_trace as decode
from ..tokenizer import Tokenizer

DEFAULT_PREFIX_CACHE_BYTES = 256 << 20  # --prefix-cache-mb 256


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
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)  # for the latency metrics
    first_token_at: float | None = None
    last_token_at: float | None = None
    index: int = 0  # which of the request's n samples this is (its seed is derived from it)
    # the other samples, prefilled with this one
    forks: list["Request"] = field(default_factory=list)
    # per-row hooks of the generation core (see llamakin.generation.rows): a factory of this row's
    # logits processors (called once per row, so stateful ones such as a JSON grammar start fresh for
    # every sample), and the index of the row's LoRA adapter (llamakin.lora.multi; 0: the base model)
    make_processors: Callable[[], list[LogitsProcessor]] | None = None
    adapter: int = 0

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the server's event loop is closed: nobody is listening any more
            pass


class Engine:
    """Owns the model, the tokenizer and the generation core's rows; serves :class:`Request` objects."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        context: int | None = None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ):
        if max_batch < 1 or max_queue < 1:
            raise LlamakinError("--max-batch and --max-queue must be at least 1.")
        if prefix_cache_bytes < 0:
            raise LlamakinError(
                "--prefix-cache-mb must be 0 (off) or a positive number of megabytes."
            )
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(
            context or model.config.max_position_embeddings, model.config.max_position_embeddings
        )
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.batch = RowBatch(
            model,
            tokenizer.eos_token_ids,
            max_batch,
            self.context,
            self.prefix_cache,
            select_adapters=lambda adapters: select_rows(model, [a or 0 for a in adapters]),
        )
        self.cache = self.batch.cache
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.stopping = False
        self.generated_tokens = 0
        self.metrics = None  # a ServerMetrics, told of every sampled token
        self.thread = threading.Thread(target=self._loop, name="llamakin-engine", daemon=True)
        self.thread.start()

    @property
    def rows(self) -> list[Row]:
        return self.batch.rows

    @property
    def prefix_caching(self) -> bool:
        """Whether prompts reuse earlier keys/values (off by flag, or for a model where it is not exact)."""
        return self.batch.prefix_cache is not None

    # -- called from the server's event loop ---------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue ``request`` (and its ``forks``, the other samples of the same prompt)."""
        if len(request.prompt_ids) + request.params.max_new_tokens > self.context:
            raise LlamakinError(
                f"the prompt has {len(request.prompt_ids)} tokens and max_tokens is {request.params.max_new_tokens}, "
                f"together more than this server's context of {self.context} tokens; shorten the prompt or lower max_tokens."
            )
        if 1 + len(request.forks) > self.max_batch:
            raise LlamakinError(
                f"n={1 + len(request.forks)} samples need as many rows, but this server decodes at most "
                f"{self.max_batch} (--max-batch); lower n."
            )
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self.waiting)} requests are already waiting; retry shortly."
                )
            self.waiting.append(request)
        self.wakeup.set()

    def status(self) -> dict[str, int]:
        status = {
            "running": len(self.rows),
            "waiting": len(self.waiting),
            "max_batch": self.max_batch,
            "context": self.context,
            "generated_tokens": self.generated_tokens,
            "decode_traces": len(decode.TRACES),
            "decode_traces_recorded": decode.TRACES.traced,
        }
        if self.prefix_caching:
            status["prefix_cache"] = self.prefix_cache.stats()
        return status

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
                        row.owner.emit("error", f"generation failed: {e}")
                    self.rows.clear()

    def _admit(self) -> None:
        while self.batch.free:
            with self.lock:
                if not self.waiting:
                    return
                request = self.waiting[0]
                if 1 + len(request.forks) > self.batch.free:
                    return  # the whole group waits for rows enough
                self.waiting.popleft()
            group = [request, *request.forks]
            if all(r.cancelled.is_set() for r in group):
                continue
            try:
                self._prefill(request)
            except Exception as e:  # noqa: BLE001 - this request alone fails
                for r in group:
                    r.emit("error", _failure(e))

    def _row(self, request: Request) -> Row:
        params, model = request.params, self.model
        processors = request.make_processors() if request.make_processors is not None else ()
        sampler = RowSampler(
            params,
            model.config.vocab_size,
            model.device,
            request.prompt_ids,
            request.index,
            processors,
        )
        return Row(
            list(request.prompt_ids),
            params,
            sampler,
            TextStream(self.tokenizer, params.stop),
            owner=request,
            adapter=request.adapter,
            on_text=lambda piece: request.emit("text", piece),
            on_token=lambda token, kept: self._counted(request, kept),
            cancelled=request.cancelled.is_set,
        )

    def _counted(self, request: Request, kept: bool) -> None:
        if kept:
            self.generated_tokens += 1
        if self.metrics is not None:
            self.metrics.token(request)

    def _prefill(self, request: Request) -> None:
        """Admit ``request`` and its forks: one prefill, a first token each."""
        self.batch.admit([self._row(r) for r in (request, *request.forks)])

    def _step(self) -> None:
        self.batch.step()
        self._retire()

    def _retire(self) -> None:
        """Finish every row that is done or cancelled and tell its request."""
        for row in self.batch.retire():
            request = row.owner
            if row.error is not None:
                request.emit("error", _failure(row.error))
            elif row.result.finish_reason is not None:
                request.emit("done", row.result)


def _failure(error: Exception) -> str:
    return f"generation failed for this request ({type(error).__name__}: {error}); other requests were not affected."


def new_request(
    prompt_ids: list[int],
    params: SamplingParams,
    n: int = 1,
    make_processors: Callable[[], list[LogitsProcessor]] | None = None,
    adapter: int = 0,
) -> Request:
    """A request bound to the running event loop; with ``n > 1`` its ``forks`` are the other samples
    (each with its own event queue, sample index and derived seed, the same hooks)."""
    loop = asyncio.get_running_loop()
    request = Request(
        prompt_ids, params, loop, asyncio.Queue(), make_processors=make_processors, adapter=adapter
    )
    request.forks = [
        Request(
            prompt_ids,
            params,
            loop,
            asyncio.Queue(),
            id=request.id,
            index=i,
            make_processors=make_processors,
            adapter=adapter,
        )
        for i in range(1, n)
    ]
    return request


__all__ = ["Engine", "QueueFull", "Request", "new_request"]
