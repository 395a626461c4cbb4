"""``GET /metrics``: the server's state and history in Prometheus' text format.

Written with ``prometheus_client`` (the Prometheus project's own library) into a registry of this
server's own, so two servers in one process never share counters. The names follow Prometheus'
conventions (https://prometheus.io/docs/practices/naming/: base units, ``_total`` for counters)
and cover what vLLM's ``/metrics`` reports (requests running and waiting, prompt and generated
tokens, time to first token, time per output token, KV-cache use):

* ``llamakin_http_requests_total{endpoint, status}``: every answered HTTP request, by path (known
  paths only, others are ``other``) and status code (so 400s, 429s and 500s are counted apart);
* ``llamakin_request_finished_total{reason}``: generations by how they ended (``stop``,
  ``length``, ``error``, ``abort`` when the client went away);
* ``llamakin_prompt_tokens_total``, ``llamakin_generation_tokens_total``: tokens in and out;
* ``llamakin_requests_running``, ``llamakin_requests_waiting``: rows being decoded, requests queued;
* ``llamakin_time_to_first_token_seconds``: from the request's arrival (queueing included) to its
  first sampled token; ``llamakin_time_per_output_token_seconds``: between two tokens of a row;
* ``llamakin_kv_cache_usage_ratio`` (slots holding a running row's tokens over all slots),
  ``llamakin_kv_cache_used_tokens``, ``llamakin_kv_cache_capacity_tokens``, ``llamakin_kv_cache_bytes``;
* ``llamakin_model_info{model, dtype, quantization, device}``: always 1, the labels carry the facts.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..quant.model import weights_summary

# Prometheus' text format 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/), which
# every scraper reads; with names and labels of the classic character set (all of these are) the
# text generate_latest writes is that format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
ENDPOINTS = frozenset(
    {
        "/",
        "/health",
        "/metrics",
        "/tokenize",
        "/detokenize",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
    }
)


class _EngineState:
    """A collector reading the engine's state at scrape time (nothing to keep in sync)."""

    def __init__(self, engine):
        self.engine = engine
        self.cache_bytes = sum(
            t.numel() * t.element_size() for t in engine.cache.keys + engine.cache.values
        )

    def collect(self):
        engine = self.engine
        rows = list(engine.rows)  # the engine thread may change the list meanwhile: read it once
        used = sum(row.length for row in rows)
        capacity = engine.max_batch * engine.context
        yield GaugeMetricFamily(
            "llamakin_requests_running", "Requests being decoded now.", value=len(rows)
        )
        yield GaugeMetricFamily(
            "llamakin_requests_waiting",
            "Requests queued for a free row.",
            value=len(engine.waiting),
        )
        yield CounterMetricFamily(
            "llamakin_generation_tokens",
            "Tokens generated (end-of-sequence not counted).",
            value=engine.generated_tokens,
        )
        yield GaugeMetricFamily(
            "llamakin_kv_cache_usage_ratio",
            "Fraction of the KV cache's slots holding a running request's tokens.",
            value=used / capacity,
        )
        yield GaugeMetricFamily(
            "llamakin_kv_cache_used_tokens",
            "KV-cache slots holding a running request's tokens.",
            value=used,
        )
        yield GaugeMetricFamily(
            "llamakin_kv_cache_capacity_tokens",
            "KV-cache slots: rows times context.",
            value=capacity,
        )
        yield GaugeMetricFamily(
            "llamakin_kv_cache_bytes",
            "Memory held by the KV cache's keys and values.",
            value=self.cache_bytes,
        )
        prefix = engine.prefix_cache.stats() if getattr(engine, "prefix_caching", False) else None
        if prefix is not None:
            yield CounterMetricFamily(
                "llamakin_prefix_cache_hits",
                "Prompts that reused cached keys/values of an earlier request.",
                value=prefix["hits"],
            )
            yield CounterMetricFamily(
                "llamakin_prefix_cache_reused_tokens",
                "Prompt tokens whose keys/values were reused instead of computed.",
                value=prefix["reused_tokens"],
            )
            yield GaugeMetricFamily(
                "llamakin_prefix_cache_bytes",
                "Memory held by the prefix cache.",
                value=prefix["bytes"],
            )
            yield GaugeMetricFamily(
                "llamakin_prefix_cache_entries",
                "Sequences in the prefix cache.",
                value=prefix["entries"],
            )


class ServerMetrics:
    """The server's metrics; the engine calls :meth:`token` for every sampled token."""

    def __init__(self, engine, model_name: str):
        self.registry = registry = CollectorRegistry()
        self.http_requests = Counter(
            "llamakin_http_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.finished = Counter(
            "llamakin_request_finished",
            "Generations ended, by reason (stop, length, error, abort).",
            ["reason"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "llamakin_prompt_tokens",
            "Prompt tokens of the generation requests accepted.",
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "llamakin_time_to_first_token_seconds",
            "From a request's arrival (queueing included) to its first token.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "llamakin_time_per_output_token_seconds",
            "Between two consecutive tokens of one request.",
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        dtype, quantization = weights_summary(engine.model)
        model_info = GaugeMetricFamily(
            "llamakin_model_info",
            "The served model; the value is always 1.",
            labels=["model", "dtype", "quantization", "device"],
        )
        model_info.add_metric([model_name, dtype, quantization, str(engine.model.device)], 1)
        registry.register(_Constant(model_info))
        registry.register(_EngineState(engine))

    def token(self, request, now: float | None = None) -> None:
        """Record one sampled token of ``request`` (called on the engine thread)."""
        now = time.monotonic() if now is None else now
        if request.first_token_at is None:
            request.first_token_at = now
            self.time_to_first_token.observe(now - request.created)
        else:
            self.time_per_output_token.observe(now - request.last_token_at)
        request.last_token_at = now

    def render(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE


class _Constant:
    def __init__(self, family):
        self.family = family

    def collect(self):
        yield self.family


class CountResponses:
    """ASGI middleware counting every answer by endpoint and status (401s and 413s included)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if status is not None:
                endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
                self.metrics.http_requests.labels(endpoint, str(status)).inc()


__all__ = ["CountResponses", "ServerMetrics", "weights_summary"]
