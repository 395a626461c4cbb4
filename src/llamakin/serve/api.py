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
from ..generate import RowResult, SamplingParams
from ..lora.multi import with_adapter
from .engine import Engine, QueueFull, new_request
from .logprobs import chat_logprobs, completions_logprobs, token_logprobs
from .metrics import CountResponses, ServerMetrics
from .page import add_page_route
from .schema import APIError, ChatRequest, CompletionRequest, parse_body, sampling_params
from .tokens import add_token_routes


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- the application -----------------------------------------------------------------------------
DRAIN_FACTOR = 16  # an oversized chunked body is read (and dropped) up to this many times the limit
KEYED_PATHS = ("/v1", "/tokenize", "/detokenize")  # what --api-key guards (the page, /health and /metrics are open)


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
                message = ("no API key was provided; send 'Authorization: Bearer <key>'." if not given
                           else "the API key is not correct.")
                return await error_response(401, message, code="invalid_api_key")(scope, receive, send)
        too_big = error_response(413, f"the request body is larger than {self.limit} bytes; send less.",
                                 code="request_too_large", headers={"Connection": "close"})
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


_STATUS_MESSAGES = {404: "there is no such endpoint; the API is under /v1 (models, completions, chat/completions), "
                         "beside /tokenize, /detokenize, /metrics, /health and the chat page at /.",
                    405: "this endpoint does not accept the {method} method."}


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, adapters: list[str] = ()) -> CountResponses:
    """``adapters``: the names of the LoRA adapters attached to the engine's model
    (:func:`llamakin.lora.multi.attach_adapters`, indices 1, 2, ...); a request's ``model`` picks one."""
    app = FastAPI(title="llamakin", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = False  # a redirect is no answer for an API client: unknown paths are 404
    created = int(time.time())
    metrics = ServerMetrics(engine, model_name)
    engine.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException):
        message = _STATUS_MESSAGES.get(exc.status_code, "{detail}").format(method=request.method, detail=exc.detail)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, message, kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):  # no route validates a body through FastAPI
        return error_response(400, f"invalid request: {exc.errors()[:1]}.", code="invalid_value")

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):  # a bug: still OpenAI's shape, and the server keeps serving
        return error_response(500, f"internal error ({type(exc).__name__}: {exc}).", kind="server_error")

    served = {model_name: 0, **{name: index for index, name in enumerate(adapters, start=1)}}

    def check_model(name: str) -> int:
        """The adapter index of the model a request names (0: the base)."""
        if name not in served:
            listed = "', '".join(served)
            raise APIError(404, f"the model '{name}' does not exist here; this server serves '{listed}'.",
                           param="model", code="model_not_found")
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
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "llamakin"}]
                + [{"id": name, "object": "model", "created": created, "owned_by": "llamakin", "parent": model_name}
                   for name in adapters]}

    def submit(prompt_ids: list[int], params: SamplingParams, adapter: int = 0):
        request = new_request(prompt_ids, params, adapter)
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(429, str(e), kind="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except LlamakinError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        metrics.prompt_tokens.inc(len(prompt_ids))
        return request

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
                    result = asyncio.ensure_future(request.events.get())  # a text piece: keep waiting
                else:
                    metrics.finished.labels("abort").inc()
                    raise APIError(499, "the client closed the request.")  # nobody reads this answer
        finally:
            request.cancelled.set()  # finished or abandoned: the engine frees the row either way
            for task in (result, gone):
                task.cancel()

    def usage(prompt_len: int, result: RowResult) -> dict[str, int]:
        completion = len(result.token_ids)
        return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}

    async def sse(request, chunk, final, include_usage: bool, prompt_len: int) -> AsyncIterator[str]:
        """Server-sent events: text chunks, the finishing chunk, optional usage, ``[DONE]``; a
        failure of this request's generation is one ``error`` event, then the stream ends."""
        ended = False
        try:
            first = chunk(None, role=True)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                kind, payload = await request.events.get()
                if kind == "text":
                    yield f"data: {json.dumps(chunk(payload))}\n\n"
                elif kind == "done":
                    ended = True
                    metrics.finished.labels(payload.finish_reason).inc()
                    yield f"data: {json.dumps(final(payload))}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps(final(payload, usage=usage(prompt_len, payload)))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    ended = True
                    metrics.finished.labels("error").inc()
                    error = APIError(500, payload, kind="server_error", code="generation_failed").body()
                    yield f"data: {json.dumps(error)}\n\n"
                    return
        finally:  # the client went away (or we finished): stop generating for it
            if not ended:
                metrics.finished.labels("abort").inc()
            request.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        body = parse_body(await http.body(), ChatRequest)
        adapter = check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
        if body.logprobs and body.stream:
            raise APIError(400, "logprobs are not streamed by this server; send the request without stream.",
                           param="logprobs", code="unsupported_parameter")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = engine.tokenizer.apply_chat_template(messages)
        except (TemplateError, LlamakinError) as e:
            raise APIError(400, str(e), param="messages") from None
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise APIError(400, "the chat renders to no tokens at all; send a message with some text.", param="messages")
        params = sampling_params(body, len(ids), engine.context, "messages")
        request = submit(ids, params, adapter)
        rid, now = f"chatcmpl-{request.id}", int(time.time())
        base = {"id": rid, "created": now, "model": body.model}
        if body.stream:
            def chunk(text, role=False):
                delta = {"role": "assistant", "content": ""} if role else {"content": text}
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}

            def final(result, usage=None):
                if usage is not None:
                    return {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": result.finish_reason}]}

            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(request, chunk, final, include, len(ids)), media_type="text/event-stream")
        result = await collect(request, http)
        logprobs = None
        if body.logprobs:
            scored = await asyncio.to_thread(with_adapter, engine.model, adapter, token_logprobs, engine.model,
                                             ids + result.token_ids, len(ids), body.top_logprobs or 0)
            logprobs = chat_logprobs(engine.tokenizer, scored)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": logprobs,
                             "finish_reason": result.finish_reason}],
                "usage": usage(len(ids), result)}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = parse_body(await http.body(), CompletionRequest)
        adapter = check_model(body.model)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], list):  # a batch of token-id prompts
            if body.stream:
                raise APIError(400, "a batch of prompts cannot be streamed; send them one by one.", param="prompt")
            return await completions_batch(body, [list(p) for p in prompt], http, adapter=adapter)
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "the prompt is empty; send some text to continue.", param="prompt")
            ids = engine.tokenizer.encode(prompt)
            if not ids:
                raise APIError(400, "the prompt encodes to no tokens; send some text to continue.", param="prompt")
        else:
            if any(not 0 <= t < engine.model.config.vocab_size for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {engine.model.config.vocab_size}).", param="prompt")
            ids = list(prompt)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 generates nothing; it is only useful with echo (the prompt's logprobs).",
                           param="max_tokens")
        if body.stream and (body.echo or body.logprobs is not None):
            raise APIError(400, "echo and logprobs are not streamed by this server; send the request without stream.",
                           param="echo" if body.echo else "logprobs", code="unsupported_parameter")
        if not body.stream:
            return await completions_batch(body, [ids], http, text=prompt if isinstance(prompt, str) else None,
                                           adapter=adapter)
        params = sampling_params(body, len(ids), engine.context, "prompt")
        request = submit(ids, params, adapter)
        rid, now = f"cmpl-{request.id}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": body.model}
        if body.stream:
            def chunk(text, role=False):
                if role:
                    return None
                return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}

            def final(result, usage=None):
                if usage is not None:
                    return {**base, "choices": [], "usage": usage}
                return {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                             "finish_reason": result.finish_reason}]}

            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(request, chunk, final, include, len(ids)), media_type="text/event-stream")
        raise AssertionError("unreachable: non-streamed completions are answered by completions_batch")

    async def completions_batch(body: CompletionRequest, prompts: list[list[int]], http: HTTPRequest,
                                text: str | None = None, adapter: int = 0) -> dict:
        """Non-streamed completions of one or more prompts (one choice each, in order), with ``echo``
        and ``logprobs`` (``max_tokens: 0`` with ``echo``: the prompt's own token log-probabilities)."""
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for ids in prompts for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab}).", param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 generates nothing; it is only useful with echo (the prompt's logprobs).",
                           param="max_tokens")
        requests = []
        try:
            for ids in ([] if body.max_tokens == 0 else prompts):
                requests.append(submit(ids, sampling_params(body, len(ids), engine.context, "prompt"), adapter))
            results = [await collect(r, http) for r in requests] or [RowResult(finish_reason="length") for _ in prompts]
        except BaseException:
            for r in requests:  # a rejected or abandoned batch frees the rows it already holds
                r.cancelled.set()
            raise
        rid, now = f"cmpl-{requests[0].id if requests else uuid.uuid4().hex[:24]}", int(time.time())
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, (ids, result) in enumerate(zip(prompts, results)):
            prompt_text = text if text is not None else engine.tokenizer.decode(ids)
            logprobs = None
            if body.logprobs is not None:
                stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
                generated = engine.tokenizer.decode(result.token_ids)
                by_eos = requests and result.finish_reason == "stop" and not any(s in generated for s in stops)
                scored = await asyncio.to_thread(with_adapter, engine.model, adapter, token_logprobs, engine.model,
                                                 ids + result.token_ids, 0 if body.echo else len(ids), body.logprobs,
                                                 engine.tokenizer.eos_token_ids if by_eos else ())
                logprobs = completions_logprobs(engine.tokenizer, scored)
            choices.append({"index": index, "text": (prompt_text if body.echo else "") + result.text,
                            "logprobs": logprobs, "finish_reason": result.finish_reason})
            prompt_tokens += len(ids)
            completion_tokens += len(result.token_ids)
        return {"id": rid, "object": "text_completion", "created": now, "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return CountResponses(Guard(app, max_body_bytes, api_key), metrics)
