"""Prometheus metrics: requests, latency and errors by route and model (one registry per app)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vlmserve_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram(
            "vlmserve_request_latency_seconds", "HTTP request latency", ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry,
        )
        self.errors = Counter("vlmserve_errors", "Error responses", ["route", "model", "status"],
                              registry=self.registry)
        self.rejected = Counter("vlmserve_rejected", "Requests refused for overload (429) or backend down (503)",
                                ["route", "status"], registry=self.registry)
        self.items = Counter("vlmserve_inference_items", "Items sent to Triton", ["model"], registry=self.registry)
        # What a cluster autoscales the gateway on (docs/scale-out.md): requests being served right now.
        self.in_flight = Gauge("vlmserve_requests_in_flight", "HTTP requests being served", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (streams untouched); labels use the route template, not the raw path."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        self.metrics.in_flight.inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)
            if status >= 400:
                model = scope.get("state", {}).get("model", "-")
                self.metrics.errors.labels(route, model, str(status)).inc()
            if status in (429, 503):
                self.metrics.rejected.labels(route, str(status)).inc()
