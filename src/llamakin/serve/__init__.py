"""An OpenAI-compatible server over llamakin's continuous-batching engine (``llamakin serve``)."""

from __future__ import annotations

import ipaddress
import sys

from .api import create_app
from .engine import Engine, QueueFull, Request

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(model, tokenizer, model_name: str, host: str = LOOPBACK, port: int = 8000, api_key: str | None = None,
        max_batch: int = 8, max_queue: int = 64, context: int | None = None, max_body_bytes: int = 1 << 20) -> None:
    """Serve until interrupted. Binds to loopback unless another host is asked for explicitly."""
    import uvicorn

    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, context=context)
    app = create_app(engine, model_name, api_key=api_key, max_body_bytes=max_body_bytes)
    if not is_loopback(host) and not api_key:
        print(f"llamakin: warning: serving on {host} without --api-key: anyone who can reach it can use it.",
              file=sys.stderr)
    print(f"llamakin: serving {model_name} on http://{host}:{port}/v1 (batch {max_batch}, queue {max_queue}, "
          f"context {engine.context})", file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.stop()


__all__ = ["Engine", "QueueFull", "Request", "create_app", "is_loopback", "run"]
