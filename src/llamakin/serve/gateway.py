"""What every route needs from the engine: the served model names, submitting a generation,
waiting for its result (cancelled if the client leaves) and streaming its events as SSE.

The routes (:mod:`.chat_route`, :mod:`.completions_route`, :mod:`.tokens`) turn OpenAI's request
shapes into token ids and sampling parameters and shape the answers; this module is the one place
that talks to the :class:`~llamakin.serve.engine.Engine` and counts what finished in
:class:`~llamakin.serve.metrics.ServerMetrics`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Callable

from fastapi import Request as HTTPRequest

from ..errors import LlamakinError
from ..generation import RowResult, SamplingParams
from .engine import Engine, QueueFull, new_request
from .metrics import ServerMetrics
from .schema import APIError


def total_usage(prompt_len: int, results: list[RowResult]) -> dict[str, int]:
    """The prompt counted once (it is prefilled once), the completions of every choice summed."""
    completion = sum(len(r.token_ids) for r in results)
    return {
        "prompt_tokens": prompt_len,
        "completion_tokens": completion,
        "total_tokens": prompt_len + completion,
    }


def _events_text(value) -> str:
    """One SSE ``data:`` line per event; ``value`` is an event, a list of them, or None."""
    return "".join(
        f"data: {json.dumps(v)}\n\n"
        for v in (value if isinstance(value, list) else [value])
        if v is not None
    )


class Gateway:
    """The engine as the routes see it. ``adapters``: the names of the LoRA adapters attached to
    the engine's model (:func:`llamakin.lora.multi.attach_adapters`, indices 1, 2, ...)."""

    def __init__(
        self, engine: Engine, model_name: str, metrics: ServerMetrics, adapters: list[str] = ()
    ):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.adapters = list(adapters)
        self.created = int(time.time())
        self.served = {
            model_name: 0,
            **{name: index for index, name in enumerate(self.adapters, start=1)},
        }

    def check_model(self, name: str) -> int:
        """The adapter index of the model a request names (0: the base)."""
        if name not in self.served:
            listed = "', '".join(self.served)
            raise APIError(
                404,
                f"the model '{name}' does not exist here; this server serves '{listed}'.",
                param="model",
                code="model_not_found",
            )
        return self.served[name]

    def models(self) -> dict:
        """``GET /v1/models``: the base model, then each adapter with the base as its parent."""
        entry = {"object": "model", "created": self.created, "owned_by": "llamakin"}
        return {
            "object": "list",
            "data": [{"id": self.model_name, **entry}]
            + [{"id": name, **entry, "parent": self.model_name} for name in self.adapters],
        }

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        make_processor: Callable | None = None,
        adapter: int = 0,
    ) -> list:
        """Queue one generation of ``n`` samples; their requests, in choice order. ``make_processor()``
        (constrained decoding) gives each sample its own stateful logits processor, or None;
        ``adapter``: the index of the LoRA adapter the request names (0: the base model)."""
        engine = self.engine
        if n > engine.max_batch:
            raise APIError(
                400,
                f"n={n} samples need as many rows, but this server decodes at most "
                f"{engine.max_batch} at once (--max-batch); lower n.",
                param="n",
                code="invalid_value",
            )

        def make_processors() -> list:
            processor = make_processor() if make_processor is not None else None
            return [] if processor is None else [processor]

        request = new_request(prompt_ids, params, n, make_processors, adapter)
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(
                429,
                str(e),
                kind="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None
        except LlamakinError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return [request, *request.forks]

    async def collect_all(self, requests, http: HTTPRequest) -> list[RowResult]:
        """Every request's result; all are cancelled if one fails or the client leaves."""
        try:
            return [await self.collect(r, http) for r in requests]
        except BaseException:
            for r in requests:
                r.cancelled.set()
            raise

    async def collect(self, request, http: HTTPRequest) -> RowResult:
        """Wait for a non-streamed result; cancel the generation if the client goes away first."""

        async def disconnected() -> None:
            while (await http.receive())["type"] != "http.disconnect":
                pass

        finished = self.metrics.finished
        result = asyncio.ensure_future(request.events.get())
        gone = asyncio.ensure_future(disconnected())
        try:
            while True:
                await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not result.done():
                    finished.labels("abort").inc()
                    raise APIError(499, "the client closed the request.")  # nobody reads it
                kind, payload = result.result()
                if kind == "done":
                    finished.labels(payload.finish_reason).inc()
                    return payload
                if kind == "error":
                    finished.labels("error").inc()
                    raise APIError(500, payload, kind="server_error", code="generation_failed")
                result = asyncio.ensure_future(request.events.get())  # a text piece: wait on
        finally:
            request.cancelled.set()  # finished or abandoned: the engine frees the row either way
            for task in (result, gone):
                task.cancel()

    @staticmethod
    async def events(requests) -> AsyncIterator[tuple[int, str, object]]:
        """``(choice index, kind, payload)`` of every request, as they come."""
        waiting = {asyncio.ensure_future(r.events.get()): i for i, r in enumerate(requests)}
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=waiting.get):
                    index = waiting.pop(task)
                    kind, payload = task.result()
                    yield index, kind, payload
                    if kind == "text":
                        waiting[asyncio.ensure_future(requests[index].events.get())] = index
        finally:
            for task in waiting:
                task.cancel()

    async def sse(
        self, requests, chunk, final, include_usage: bool, prompt_len: int
    ) -> AsyncIterator[str]:
        """Server-sent events: text chunks of every choice, each choice's finishing chunk, optional
        usage, ``[DONE]``; a failure of this request's generation is one ``error`` event, then the
        stream ends. ``chunk`` and ``final`` return one event, a list of them, or None."""
        finished = self.metrics.finished
        ended = False
        results: dict[int, RowResult] = {}
        try:
            for index in range(len(requests)):
                yield _events_text(chunk(None, index, role=True))
            async for index, kind, payload in self.events(requests):
                if kind == "text":
                    yield _events_text(chunk(payload, index))
                elif kind == "done":
                    results[index] = payload
                    finished.labels(payload.finish_reason).inc()
                    yield _events_text(final(payload, index))
                    if len(results) == len(requests):
                        ended = True
                        if include_usage:
                            usage = total_usage(prompt_len, list(results.values()))
                            yield _events_text(final(payload, index, usage=usage))
                        yield "data: [DONE]\n\n"
                        return
                else:
                    ended = True
                    finished.labels("error").inc()
                    error = APIError(500, payload, kind="server_error", code="generation_failed")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
        finally:  # the client went away (or we finished, or one choice failed): stop generating
            if not ended:
                finished.labels("abort").inc()
            for request in requests:
                request.cancelled.set()
