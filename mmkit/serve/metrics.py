"""Prometheus metrics of the server (``GET /metrics``), with the ``prometheus-client`` package.

Counters and histograms are updated when a request ends; the engine's gauges (queue depth, running
batch) and its image-cache counters are read at scrape time. Each app has its own registry, so
several apps in one process (tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics", "StatusCounter"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Reads the engine's live state at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        yield GaugeMetricFamily("mmkit_queue_depth", "Requests admitted but waiting for a batch slot",
                                value=e.queue_depth)
        yield GaugeMetricFamily("mmkit_running_requests", "Requests holding a batch slot (prefilling or decoding)",
                                value=e.num_running)
        yield GaugeMetricFamily("mmkit_decode_batch_size", "Sequences in the last decode step",
                                value=e.last_batch_size)
        yield GaugeMetricFamily("mmkit_max_batch_size", "Batch slots", value=e.max_batch_size)
        cache = e.image_cache
        yield CounterMetricFamily("mmkit_image_cache_hits", "Images whose features came from the cache",
                                  value=cache.hits)
        yield CounterMetricFamily("mmkit_image_cache_misses", "Images run through the vision tower",
                                  value=cache.misses)
        yield GaugeMetricFamily("mmkit_image_cache_bytes", "Bytes of cached image features", value=cache.bytes)


class ServeMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("mmkit_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.finished = Counter("mmkit_request_finish", "Admitted requests by how they ended "
                                "(stop, length, cancelled, error)", ["reason"], registry=r)
        self.prompt_tokens = Counter("mmkit_prompt_tokens", "Prompt tokens of finished requests (images included)",
                                     registry=r)
        self.generation_tokens = Counter("mmkit_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("mmkit_time_to_first_token_seconds", "From submission to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("mmkit_time_per_output_token_seconds",
                              "Mean time between generated tokens, per request", buckets=_TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("mmkit_request_latency_seconds", "From submission to the last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def observe(self, req, reason: str) -> None:
        """A request left the engine (``req`` an EngineRequest)."""
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(req.prompt_tokens)
        self.generation_tokens.inc(req.completion_tokens)
        if req.t_first is not None:
            self.ttft.observe(req.t_first - req.t_submit)
            if req.completion_tokens > 1 and req.t_done is not None:
                self.tpot.observe((req.t_done - req.t_first) / (req.completion_tokens - 1))
        if req.t_done is not None:
            self.latency.observe(req.t_done - req.t_submit)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatusCounter:
    """ASGI middleware: counts the HTTP status of every ``/v1/chat/completions`` response."""

    def __init__(self, app, metrics: ServeMetrics, path: str = "/v1/chat/completions"):
        self.app, self.metrics, self.path = app, metrics, path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != self.path:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)
