"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, ``/health``.

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
status OpenAI uses: 400 for bad requests (including FastAPI's own validation errors, which it
would otherwise send as 422), 401 without the bearer key, 404 for an unknown model, 413 for an
oversized body, 429 with ``Retry-After`` when the queue is full. A client that disconnects has its
generation cancelled and its cache row freed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, Strict

from ..chat_template import TemplateError
from ..errors import LlamakinError
from ..generate import RowResult, SamplingParams
from .engine import Engine, QueueFull, new_request
from .logprobs import MAX_TOP_LOGPROBS, chat_logprobs, completions_logprobs, token_logprobs

StrictFloat = Annotated[float, Strict()]
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
StrictStr = Annotated[str, Strict()]


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = status, message, kind, param, code, headers


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- request bodies --------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0, le=2)
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None
    frequency_penalty: StrictFloat = Field(0.0, ge=-2, le=2)
    presence_penalty: StrictFloat = Field(0.0, ge=-2, le=2)
    logprobs: Any = None
    logit_bias: Any = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: Any = None
    functions: Any = None
    response_format: Any = None


class CompletionRequest(_Sampling):
    prompt: (StrictStr | Annotated[list[StrictInt], Field(min_length=1)]
             | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
             | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1, max_length=64)])
    max_tokens: StrictInt | None = Field(16, ge=0)  # OpenAI's default for completions; 0 only with echo
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # top-N per token
    suffix: Any = None
    best_of: Any = None


def _unsupported(body: _Sampling, names: list[str]) -> None:
    """A clear 400 for a parameter llamakin does not implement, rather than silently ignoring it."""
    for name in names:
        value = getattr(body, name, None)
        if value not in (None, False, [], {}):
            raise APIError(400, f"'{name}' is not supported by this server; remove it from the request.", param=name,
                           code="unsupported_parameter")
    if body.n != 1:
        raise APIError(400, "only n=1 is supported; send several requests instead.", param="n",
                       code="unsupported_parameter")


# -- the application -----------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 before any parsing."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, f"the request body is larger than {self.limit} bytes; send less.",
                                 code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await too_big(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="llamakin", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON; send a JSON object.", code="invalid_json")
        where = ".".join(loc) or "body"
        return error_response(400, f"invalid value for '{where}': {first.get('msg', 'invalid')}.", param=where or None,
                              code="invalid_value")

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {api_key}":
                message = ("no API key was provided; send 'Authorization: Bearer <key>'." if not header
                           else "the API key is not correct.")
                return error_response(401, message, code="invalid_api_key")
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist here; this server serves '{model_name}'.",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.status()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "llamakin"}]}

    def sampling(body: _Sampling, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        room = engine.context - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens, which leaves no room in this server's "
                                f"context of {engine.context} tokens; shorten it.", param="messages",
                           code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}, together more "
                                f"than this server's context of {engine.context} tokens; lower max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(max_new_tokens=max_tokens or room, temperature=body.temperature, top_p=body.top_p,
                              seed=body.seed, stop=stop, frequency_penalty=body.frequency_penalty,
                              presence_penalty=body.presence_penalty)

    def submit(prompt_ids: list[int], params: SamplingParams):
        request = new_request(prompt_ids, params)
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(429, str(e), kind="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except LlamakinError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        return request

    async def collect(request, http: HTTPRequest) -> RowResult:
        """Wait for a non-streamed result, cancelling the generation if the client goes away."""
        while True:
            try:
                kind, payload = await asyncio.wait_for(request.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancelled.set()
                    raise APIError(499, "client closed the request") from None
                continue
            if kind == "done":
                return payload
            if kind == "error":
                raise APIError(500, payload, kind="server_error")

    def usage(prompt_len: int, result: RowResult) -> dict[str, int]:
        completion = len(result.token_ids)
        return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}

    async def sse(request, chunk, final, include_usage: bool, prompt_len: int) -> AsyncIterator[str]:
        """Server-sent events: text chunks, the finishing chunk, optional usage, ``[DONE]``."""
        try:
            first = chunk(None, role=True)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                kind, payload = await request.events.get()
                if kind == "text":
                    yield f"data: {json.dumps(chunk(payload))}\n\n"
                elif kind == "done":
                    yield f"data: {json.dumps(final(payload))}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps(final(payload, usage=usage(prompt_len, payload)))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    error = {"error": {"message": payload, "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(error)}\n\n"
                    return
        finally:  # the client went away (or we finished): stop generating for it
            request.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        check_model(body.model)
        _unsupported(body, ["tools", "functions", "logit_bias"])
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
        if body.logprobs and body.stream:
            raise APIError(400, "logprobs are not streamed by this server; send the request without stream.",
                           param="logprobs", code="unsupported_parameter")
        if body.response_format not in (None, {"type": "text"}):
            raise APIError(400, "only response_format {'type': 'text'} is supported.", param="response_format",
                           code="unsupported_parameter")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = engine.tokenizer.apply_chat_template(messages)
        except (TemplateError, LlamakinError) as e:
            raise APIError(400, str(e), param="messages") from None
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        params = sampling(body, len(ids), body.max_completion_tokens or body.max_tokens)
        request = submit(ids, params)
        rid, now = f"chatcmpl-{request.id}", int(time.time())
        base = {"id": rid, "created": now, "model": model_name}
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
            scored = await asyncio.to_thread(token_logprobs, engine.model, ids + result.token_ids, len(ids),
                                             body.top_logprobs or 0)
            logprobs = chat_logprobs(engine.tokenizer, scored)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": logprobs,
                             "finish_reason": result.finish_reason}],
                "usage": usage(len(ids), result)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model)
        _unsupported(body, ["logit_bias", "suffix", "best_of"])
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], list):  # a batch of token-id prompts
            if body.stream:
                raise APIError(400, "a batch of prompts cannot be streamed; send them one by one.", param="prompt")
            return await completions_batch(body, [list(p) for p in prompt], http)
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "the prompt is empty; send some text to continue.", param="prompt")
            ids = engine.tokenizer.encode(prompt)
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
            return await completions_batch(body, [ids], http, text=prompt if isinstance(prompt, str) else None)
        params = sampling(body, len(ids), body.max_tokens)
        request = submit(ids, params)
        rid, now = f"cmpl-{request.id}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
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
                                text: str | None = None) -> dict:
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
                requests.append(submit(ids, sampling(body, len(ids), body.max_tokens)))
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
                scored = await asyncio.to_thread(token_logprobs, engine.model, ids + result.token_ids,
                                                 0 if body.echo else len(ids), body.logprobs,
                                                 engine.tokenizer.eos_token_ids if by_eos else ())
                logprobs = completions_logprobs(engine.tokenizer, scored)
            choices.append({"index": index, "text": (prompt_text if body.echo else "") + result.text,
                            "logprobs": logprobs, "finish_reason": result.finish_reason})
            prompt_tokens += len(ids)
            completion_tokens += len(result.token_ids)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return BodyLimit(app, max_body_bytes)
