"""An OpenAI-compatible server over llamakin's continuous-batching engine (``llamakin serve``)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

from ..errors import LlamakinError
from .api import create_app
from .engine import DEFAULT_PREFIX_CACHE_BYTES, Engine, QueueFull, Request
from .metrics import weights_summary

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, or one sentence saying why there cannot be one.

    Binding here, before the model loads and before uvicorn starts, turns "address in use" and
    "unknown host" into a :class:`LlamakinError` (the CLI's exit 2) instead of uvicorn's log and
    exit 3.
    """
    if not 0 < port < 65536:
        raise LlamakinError(f"--port must be between 1 and 65535, got {port}.")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise LlamakinError(
            f"--host {host!r} does not resolve to an address ({reason}); "
            "give an IP address such as 127.0.0.1 or a name this machine knows."
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LlamakinError(
                f"port {port} on {host} is already in use; stop the other server or choose another "
                "--port."
            ) from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise LlamakinError(
                f"--host {host} is not an address of this machine; use 127.0.0.1 (or 0.0.0.0 for "
                "every interface)."
            ) from None
        if e.errno == errno.EACCES:
            raise LlamakinError(
                f"no permission to listen on port {port}; ports below 1024 need privileges, choose "
                "another --port."
            ) from None
        raise LlamakinError(f"cannot listen on {host}:{port}: {e.strerror}.") from None
    sock.set_inheritable(True)
    return sock


def startup_line(model, model_name: str, host: str, port: int, engine: Engine) -> str:
    """What is served where: model, dtype, quantization, device, the address and the engine's limits."""
    dtype, quantization = weights_summary(model)
    # an IPv6 address in a URL is bracketed (RFC 3986 section 3.2.2)
    shown = f"[{host}]" if ":" in host else host
    return (
        f"llamakin: serving {model_name} (dtype {dtype}, quantization {quantization}, device {model.device}) "
        f"at http://{shown}:{port} - chat page /, API /v1, metrics /metrics "
        f"(batch {engine.max_batch}, queue {engine.max_queue}, context {engine.context}, "
        f"prefix cache {_prefix_cache_summary(engine)})"
    )


def _prefix_cache_summary(engine: Engine) -> str:
    cache = getattr(engine, "prefix_cache", None)
    if cache is None:
        return "off"
    return f"{cache.budget_bytes >> 20} MB" if engine.prefix_caching else "off for this model"


def run(
    model,
    tokenizer,
    model_name: str,
    host: str = LOOPBACK,
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    context: int | None = None,
    max_body_bytes: int = 1 << 20,
    sock: socket.socket | None = None,
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    adapters: list[str] = (),
) -> None:
    """Serve until interrupted on ``sock`` (from :func:`bind`; bound here when not given). Binds
    to loopback unless another host is asked for explicitly. ``adapters``: the names of the LoRA
    adapters attached to ``model`` (:func:`llamakin.lora.multi.attach_adapters`), served by name."""
    import uvicorn

    sock = sock or bind(host, port)
    engine = Engine(
        model,
        tokenizer,
        max_batch=max_batch,
        max_queue=max_queue,
        context=context,
        prefix_cache_bytes=prefix_cache_bytes,
    )
    app = create_app(
        engine, model_name, api_key=api_key, max_body_bytes=max_body_bytes, adapters=adapters
    )
    if not is_loopback(host) and not api_key:
        log.warning(
            f"llamakin: warning: serving on {host} without --api-key: anyone who can reach it can use it."
        )
    log.info(startup_line(model, model_name, host, port, engine))
    if adapters:
        log.info(f"llamakin: LoRA adapters, chosen per request by 'model': {', '.join(adapters)}")
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run(
            sockets=[sock]
        )
    finally:
        engine.stop()
        sock.close()


__all__ = [
    "Engine",
    "QueueFull",
    "Request",
    "bind",
    "create_app",
    "is_loopback",
    "run",
    "startup_line",
]
