"""What stands in front of every route: OpenAI's error shape, the bearer key and the body size.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with the status OpenAI uses
(the list is in :mod:`.api`). :class:`Guard` checks the key and reads the body, at most the limit,
before any parsing, so an oversized body gets a 413 whether it declared its length or not.
"""

from __future__ import annotations

import hmac

from .schema import APIError

DRAIN_FACTOR = 16  # an oversized chunked body is read (and dropped) up to this many times the limit
# what --api-key guards (the page, /health and /metrics are open)
KEYED_PATHS = (
    "/v1",
    "/tokenize",
    "/detokenize",
)


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
                return await APIError(401, message, code="invalid_api_key").response()(
                    scope, receive, send
                )
        too_big = APIError(
            413,
            f"the request body is larger than {self.limit} bytes; send less.",
            code="request_too_large",
            headers={"Connection": "close"},
        ).response()
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
