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

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_route import add_chat_route
from .completions_route import add_completion_route
from .engine import Engine
from .gateway import Gateway
from .guard import Guard
from .metrics import CountResponses, ServerMetrics
from .page import add_page_route
from .schema import APIError
from .tokens import add_token_routes

_STATUS_MESSAGES = {
    404: "there is no such endpoint; the API is under /v1 (models, completions, chat/completions), "
    "beside /tokenize, /detokenize, /metrics, /health and the chat page at /.",
    405: "this endpoint does not accept the {method} method.",
}


def add_error_handlers(app: FastAPI) -> None:
    """Every exception a route can raise answered in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException):
        message = _STATUS_MESSAGES.get(exc.status_code, "{detail}").format(
            method=request.method, detail=exc.detail
        )
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        headers = getattr(exc, "headers", None)
        return APIError(exc.status_code, message, kind, headers=headers).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        # no route validates a body through FastAPI; kept for safety
        return APIError(
            400, f"invalid request: {exc.errors()[:1]}.", code="invalid_value"
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):
        # a bug: still OpenAI's shape, and the server keeps serving
        return APIError(500, f"internal error ({type(exc).__name__}: {exc}).", kind="server_error")


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    adapters: list[str] = (),
) -> CountResponses:
    """The ASGI app: routes behind :class:`~.guard.Guard`, counted by the metrics. ``adapters``: the
    names of the LoRA adapters attached to the engine's model (indices 1, 2, ...); a request's
    ``model`` picks one."""
    app = FastAPI(title="llamakin", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = False  # a redirect is no answer for an API client: 404 instead
    metrics = ServerMetrics(engine, model_name)
    engine.metrics = metrics
    gateway = Gateway(engine, model_name, metrics, adapters)
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.status()}

    @app.get("/metrics")
    async def prometheus_metrics():
        text, content_type = metrics.render()
        return Response(text, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return gateway.models()

    add_page_route(app)
    add_token_routes(app, engine, gateway.check_model)
    add_chat_route(app, gateway)
    add_completion_route(app, gateway)
    return CountResponses(Guard(app, max_body_bytes, api_key), metrics)
