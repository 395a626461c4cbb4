"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, ``/health``; beside it the chat page ``/`` (:mod:`.page`),
``/metrics`` (:mod:`.metrics`), ``/tokenize`` and ``/detokenize`` (:mod:`.tokens`).

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
status OpenAI uses: 400 for bad requests (what is checked is in :mod:`.schema`; OpenAI answers
validation errors with 400, so FastAPI's 422 is not used), 401 without the bearer key, 404 for an
unknown model or path, 405 for a wrong method, 413 for an oversized body (declared or chunked),
429 with ``Retry-After`` when the queue is full, 500 only for a failure of generation itself.
A client that disconnects, streaming or not, has its generation cancelled and its row freed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat_template import TemplateError
from ..errors import LlamakinError
from ..generation import RowResult, SamplingParams
from ..lora.multi import with_adapter
from .engine import Engine, QueueFull, new_request
from .logprobs import chat_logprobs, completions_logprobs, token_logprobs
from .metrics import CountResponses, ServerMetrics
from .page import add_page_route
from .schema import APIError, ChatRequest, CompletionRequest, parse_body, sampling_params
from .structured import plan_chat_output
from .tokens import add_token_routes


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- the application -----------------------------------------------------------------------------
DRAIN_FACTOR = 16  # an oversized chunked body is read (and dropped) up to this many times the limit
KEYED_PATHS = (
    "/v1",
    "/tokenize",
    "/detokenize",
)  # what --api-key guards (the page, /health and /metrics are open)


class Guard:
    """ASGI middleware in front of the app: the bearer key, and the body size before any parsing.

    The body is read here, at most ``limit`` bytes: a larger one gets a 413 whether it declared
    its ``Content-Length`` or came chunked without one. The rest of an oversized chunked body is
    read and dropped, up to :data:`DRAIN_FACTOR` times the limit, so that a client still sending
    reads the 413 instead of a reset connection. The app then receives the buffered body and,
    after it, the client's own messages (so it still learns of a disconnect).
    """

    def __init__(self, app, limit: int, api_key: str | None = None):
        self.app, self.limit, self.api_key = app, limit, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith(KEYED_PATHS):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                message = (
                    "no API key was provided; send 'Authorization: Bearer <key>'."
                    if not given
                    else "the API key is not correct."
                )
                return await error_response(401, message, code="invalid_api_key")(
                    scope, receive, send
                )
        too_big = error_response(
            413,
            f"the request body is larger than {self.limit} bytes; send less.",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before sending the whole body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.limit:
                while more and size <= DRAIN_FACTOR * self.limit:
                    message = await receive()
                    size += len(message.get("body", b""))
                    more = message["type"] == "http.request" and message.get("more_body", False)
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not more:
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


_STATUS_MESSAGES = {
    404: "there is no such endpoint; the API is under /v1 (models, completions, chat/completions), "
    "beside /tokenize, /detokenize, /metrics, /health and the chat page at /.",
    405: "this endpoint does not accept the {method} method.",
}


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    adapters: list[str] = (),
) -> CountResponses:
    """``adapters``: the names of the LoRA adapters attached to the engine's model
    (:func:`llamakin.lora.multi.attach_adapters`, indices 1, 2, ...); a request's ``model`` picks one."""
    app = FastAPI(title="llamakin", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = (
        False  # a redirect is no answer for an API client: unknown paths are 404
    )
    created = int(time.time())
    metrics = ServerMetrics(engine, model_name)
    engine.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException):
        message = _STATUS_MESSAGES.get(exc.status_code, "{detail}").format(
            method=request.method, detail=exc.detail
        )
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, message, kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(
        _, exc: RequestValidationError
    ):  # no route validates a body through FastAPI
        return error_response(400, f"invalid request: {exc.errors()[:1]}.", code="invalid_value")

    @app.exception_handler(Exception)
    async def _unexpected(
        _, exc: Exception
    ):  # a bug: still OpenAI's shape, and the server keeps serving
        return error_response(
            500, f"internal error ({type(exc).__name__}: {exc}).", kind="server_error"
        )

    served = {model_name: 0, **{name: index for index, name in enumerate(adapters, start=1)}}

    def check_model(name: str) -> int:
        """The adapter index of the model a request names (0: the base)."""
        if name not in served:
            listed = "', '".join(served)
            raise APIError(
                404,
                f"the model '{name}' does not exist here; this server serves '{listed}'.",
                param="model",
                code="model_not_found",
            )
        return served[name]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.status()}

    @app.get("/metrics")
    async def prometheus_metrics():
        text, content_type = metrics.render()
        return Response(text, media_type=content_type)

    add_page_route(app)
    add_token_routes(app, engine, check_model)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": model_name, "object": "model", "created": created, "owned_by": "llamakin"}
            ]
            + [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "llamakin",
                    "parent": model_name,
                }
                for name in adapters
            ],
        }

    def submit(
        prompt_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        make_processor=None,
        adapter: int = 0,
    ) -> list:
        """Queue one generation of ``n`` samples; their requests, in choice order. ``make_processor()``
        (constrained decoding) gives each sample its own stateful logits processor, or None;
        ``adapter``: the index of the LoRA adapter the request names (0: the base model)."""
        if n > engine.max_batch:
            raise APIError(
                400,
                f"n={n} samples need as many rows, but this server decodes at most {engine.max_batch} "
                "at once (--max-batch); lower n.",
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
        metrics.prompt_tokens.inc(len(prompt_ids))
        return [request, *request.forks]

    async def collect_all(requests, http: HTTPRequest) -> list[RowResult]:
        """Every request's result; all are cancelled if one fails or the client leaves."""
        try:
            return [await collect(r, http) for r in requests]
        except BaseException:
            for r in requests:
                r.cancelled.set()
            raise

    async def collect(request, http: HTTPRequest) -> RowResult:
        """Wait for a non-streamed result; cancel the generation if the client goes away first."""

        async def disconnected() -> None:
            while (await http.receive())["type"] != "http.disconnect":
                pass

        result = asyncio.ensure_future(request.events.get())
        gone = asyncio.ensure_future(disconnected())
        try:
            while True:
                await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
                if result.done():
                    kind, payload = result.result()
                    if kind == "done":
                        metrics.finished.labels(payload.finish_reason).inc()
                        return payload
                    if kind == "error":
                        metrics.finished.labels("error").inc()
                        raise APIError(500, payload, kind="server_error", code="generation_failed")
                    result = asyncio.ensure_future(
                        request.events.get()
                    )  # a text piece: keep waiting
                else:
                    metrics.finished.labels("abort").inc()
                    raise APIError(
                        499, "the client closed the request."
                    )  # nobody reads this answer
        finally:
            request.cancelled.set()  # finished or abandoned: the engine frees the row either way
            for task in (result, gone):
                task.cancel()

    def total_usage(prompt_len: int, results: list[RowResult]) -> dict[str, int]:
        """The prompt counted once (it is prefilled once), the completions of every choice summed."""
        completion = sum(len(r.token_ids) for r in results)
        return {
            "prompt_tokens": prompt_len,
            "completion_tokens": completion,
            "total_tokens": prompt_len + completion,
        }

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
        requests, chunk, final, include_usage: bool, prompt_len: int
    ) -> AsyncIterator[str]:
        """Server-sent events: text chunks of every choice, each choice's finishing chunk, optional
        usage, ``[DONE]``; a failure of this request's generation is one ``error`` event, then the
        stream ends. ``chunk`` and ``final`` return one event, a list of them, or None."""
        ended = False
        results: dict[int, RowResult] = {}

        def sent(value) -> str:
            return "".join(
                f"data: {json.dumps(v)}\n\n"
                for v in (value if isinstance(value, list) else [value])
                if v is not None
            )

        try:
            for index in range(len(requests)):
                yield sent(chunk(None, index, role=True))
            async for index, kind, payload in events(requests):
                if kind == "text":
                    yield sent(chunk(payload, index))
                elif kind == "done":
                    results[index] = payload
                    metrics.finished.labels(payload.finish_reason).inc()
                    yield sent(final(payload, index))
                    if len(results) == len(requests):
                        ended = True
                        if include_usage:
                            yield sent(
                                final(
                                    payload,
                                    index,
                                    usage=total_usage(prompt_len, list(results.values())),
                                )
                            )
                        yield "data: [DONE]\n\n"
                        return
                else:
                    ended = True
                    metrics.finished.labels("error").inc()
                    error = APIError(
                        500, payload, kind="server_error", code="generation_failed"
                    ).body()
                    yield f"data: {json.dumps(error)}\n\n"
                    return
        finally:  # the client went away (or we finished, or one choice failed): stop generating for it
            if not ended:
                metrics.finished.labels("abort").inc()
            for request in requests:
                request.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        body = parse_body(await http.body(), ChatRequest)
        adapter = check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
        if body.logprobs and body.stream:
            raise APIError(
                400,
                "logprobs are not streamed by this server; send the request without stream.",
                param="logprobs",
                code="unsupported_parameter",
            )
        messages = [m.for_template() for m in body.messages]
        output = await asyncio.to_thread(
            plan_chat_output, body, engine.tokenizer, engine.model.config.vocab_size
        )
        try:
            prompt = engine.tokenizer.apply_chat_template(messages, **output.template_kwargs)
        except (TemplateError, LlamakinError) as e:
            raise APIError(400, str(e), param="messages") from None
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise APIError(
                400,
                "the chat renders to no tokens at all; send a message with some text.",
                param="messages",
            )
        params = sampling_params(body, len(ids), engine.context, "messages")
        requests = submit(ids, params, body.n, output.logits_processor, adapter)
        rid, now = f"chatcmpl-{requests[0].id}", int(time.time())
        base = {"id": rid, "created": now, "model": body.model}
        if body.stream:
            deltas = [
                output.stream() for _ in requests
            ]  # per choice: content as it comes, tool calls whole

            def event(index, delta, finish_reason=None):
                return {
                    **base,
                    "object": "chat.completion.chunk",
                    "choices": [
                        {
                            "index": index,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                }

            def chunk(text, index, role=False):
                if role:
                    return event(index, {"role": "assistant", "content": ""})
                return [event(index, d) for d in deltas[index].feed(text)]

            def final(result, index, usage=None):
                if usage is not None:
                    return {
                        **base,
                        "object": "chat.completion.chunk",
                        "choices": [],
                        "usage": usage,
                    }
                calls = deltas[index]
                return [event(index, d) for d in calls.finish()] + [
                    event(index, {}, output.finish_reason(result.finish_reason, calls.calls > 0))
                ]

            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                sse(requests, chunk, final, include, len(ids)), media_type="text/event-stream"
            )
        results = await collect_all(requests, http)
        choices = []
        for index, result in enumerate(results):
            logprobs = None
            if body.logprobs:
                scored = await asyncio.to_thread(
                    with_adapter,
                    engine.model,
                    adapter,
                    token_logprobs,
                    engine.model,
                    ids + result.token_ids,
                    len(ids),
                    body.top_logprobs or 0,
                )
                logprobs = chat_logprobs(engine.tokenizer, scored)
            message = output.message(result.text)
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": output.finish_reason(
                        result.finish_reason, "tool_calls" in message
                    ),
                }
            )
        return {
            **base,
            "object": "chat.completion",
            "choices": choices,
            "usage": total_usage(len(ids), results),
        }

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = parse_body(await http.body(), CompletionRequest)
        adapter = check_model(body.model)
        prompt = (
            body.prompt[0]
            if isinstance(body.prompt, list) and isinstance(body.prompt[0], str)
            else body.prompt
        )
        if isinstance(prompt, list) and isinstance(prompt[0], list):  # a batch of token-id prompts
            if body.stream:
                raise APIError(
                    400,
                    "a batch of prompts cannot be streamed; send them one by one.",
                    param="prompt",
                )
            return await completions_batch(body, [list(p) for p in prompt], http, adapter=adapter)
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(
                    400, "the prompt is empty; send some text to continue.", param="prompt"
                )
            ids = engine.tokenizer.encode(prompt)
            if not ids:
                raise APIError(
                    400,
                    "the prompt encodes to no tokens; send some text to continue.",
                    param="prompt",
                )
        else:
            if any(not 0 <= t < engine.model.config.vocab_size for t in prompt):
                raise APIError(
                    400,
                    f"prompt token ids must be in [0, {engine.model.config.vocab_size}).",
                    param="prompt",
                )
            ids = list(prompt)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400,
                "max_tokens 0 generates nothing; it is only useful with echo (the prompt's logprobs).",
                param="max_tokens",
            )
        if body.stream and (body.echo or body.logprobs is not None):
            raise APIError(
                400,
                "echo and logprobs are not streamed by this server; send the request without stream.",
                param="echo" if body.echo else "logprobs",
                code="unsupported_parameter",
            )
        if not body.stream:
            return await completions_batch(
                body, [ids], http, text=prompt if isinstance(prompt, str) else None, adapter=adapter
            )
        params = sampling_params(body, len(ids), engine.context, "prompt")
        requests = submit(ids, params, body.n, adapter=adapter)
        rid, now = f"cmpl-{requests[0].id}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": body.model}
        if body.stream:

            def chunk(text, index, role=False):
                if role:
                    return None
                return {
                    **base,
                    "choices": [
                        {"index": index, "text": text, "logprobs": None, "finish_reason": None}
                    ],
                }

            def final(result, index, usage=None):
                if usage is not None:
                    return {**base, "choices": [], "usage": usage}
                return {
                    **base,
                    "choices": [
                        {
                            "index": index,
                            "text": "",
                            "logprobs": None,
                            "finish_reason": result.finish_reason,
                        }
                    ],
                }

            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                sse(requests, chunk, final, include, len(ids)), media_type="text/event-stream"
            )
        raise AssertionError(
            "unreachable: non-streamed completions are answered by completions_batch"
        )

    async def completions_batch(
        body: CompletionRequest,
        prompts: list[list[int]],
        http: HTTPRequest,
        text: str | None = None,
        adapter: int = 0,
    ) -> dict:
        """Non-streamed completions of one or more prompts (one choice each, in order), with ``echo``
        and ``logprobs`` (``max_tokens: 0`` with ``echo``: the prompt's own token log-probabilities)."""
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for ids in prompts for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab}).", param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400,
                "max_tokens 0 generates nothing; it is only useful with echo (the prompt's logprobs).",
                param="max_tokens",
            )
        requests = []
        try:
            for ids in [] if body.max_tokens == 0 else prompts:
                requests += submit(
                    ids,
                    sampling_params(body, len(ids), engine.context, "prompt"),
                    body.n,
                    adapter=adapter,
                )
            results = [await collect(r, http) for r in requests] or [
                RowResult(finish_reason="length") for _ in prompts for _ in range(body.n)
            ]
        except BaseException:
            for r in requests:  # a rejected or abandoned batch frees the rows it already holds
                r.cancelled.set()
            raise
        rid, now = f"cmpl-{requests[0].id if requests else uuid.uuid4().hex[:24]}", int(time.time())
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, result in enumerate(
            results
        ):  # choice p * n + j: sample j of prompt p (OpenAI's order)
            ids = prompts[index // body.n]
            prompt_text = text if text is not None else engine.tokenizer.decode(ids)
            logprobs = None
            if body.logprobs is not None:
                stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
                generated = engine.tokenizer.decode(result.token_ids)
                by_eos = (
                    requests
                    and result.finish_reason == "stop"
                    and not any(s in generated for s in stops)
                )
                scored = await asyncio.to_thread(
                    with_adapter,
                    engine.model,
                    adapter,
                    token_logprobs,
                    engine.model,
                    ids + result.token_ids,
                    0 if body.echo else len(ids),
                    body.logprobs,
                    engine.tokenizer.eos_token_ids if by_eos else (),
                )
                logprobs = completions_logprobs(engine.tokenizer, scored)
            choices.append(
                {
                    "index": index,
                    "text": (prompt_text if body.echo else "") + result.text,
                    "logprobs": logprobs,
                    "finish_reason": result.finish_reason,
                }
            )
            prompt_tokens += len(ids) if index % body.n == 0 else 0
            completion_tokens += len(result.token_ids)
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": body.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    return CountResponses(Guard(app, max_body_bytes, api_key), metrics)
