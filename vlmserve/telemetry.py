"""Request-level observability shared by the gateway and the Triton models: request ids, JSON log lines and
OpenTelemetry spans (docs/operate.md, "Follow a request").

Two settings, both off by default:

- ``VLMSERVE_LOG_FORMAT=json``: every log line is one JSON object with ``time``, ``level``, ``component``,
  ``logger``, ``request_id``, ``model`` and ``message`` (plus ``exc`` for tracebacks). Only what the code
  passes to the logger is written: no code path logs headers, keys, prompts or image bytes.
- ``VLMSERVE_OTLP_ENDPOINT=http://collector:4318``: spans are exported over OTLP/HTTP (protobuf) to
  ``<endpoint>/v1/traces``; W3C ``traceparent`` from the client is honoured. Without it, every helper here
  is a no-op and the OpenTelemetry SDK is never imported.

This module is at the bottom of the import layers: the gateway and the Triton models both use it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

LOG_FORMAT_ENV = "VLMSERVE_LOG_FORMAT"
OTLP_ENDPOINT_ENV = "VLMSERVE_OTLP_ENDPOINT"
REQUEST_ID_HEADER = "X-Request-ID"
TRACEPARENT = "traceparent"

_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
_TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


# ------------------------------------------------------------------------------------------------- request ids


@dataclass
class RequestContext:
    """What one gateway request carries through its calls: its id, the model it uses, its Triton calls."""

    request_id: str
    model: str | None = None
    calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def next_triton_id(self) -> str:
        """The id of this request's next Triton call: ``<id>`` for the first, ``<id>-2``, ``<id>-3``... after."""
        self.calls += 1
        return self.request_id if self.calls == 1 else f"{self.request_id}-{self.calls}"


current: ContextVar[RequestContext | None] = ContextVar("vlmserve_request", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a plain token (letters, digits, ``_.:-``, at most 128), else a
    new one: an id is written into logs and Triton requests, so nothing else is taken from the client."""
    if value and _ID_RE.match(value):
        return value
    return new_request_id()


def request_id() -> str | None:
    ctx = current.get()
    return ctx.request_id if ctx is not None else None


def set_model(model: str) -> None:
    ctx = current.get()
    if ctx is not None:
        ctx.model = model


# --------------------------------------------------------------------------------------------------- JSON logs

# For threads that are not in a contextvars context of their own (the Triton models' engine threads).
_thread = threading.local()


@contextmanager
def log_context(request_id: str | None, model: str | None = None) -> Iterator[None]:
    """Log lines written on this thread inside carry ``request_id`` (and ``model``)."""
    before = getattr(_thread, "ids", None)
    _thread.ids = (request_id, model)
    try:
        yield
    finally:
        _thread.ids = before


def json_logs() -> bool:
    return os.environ.get(LOG_FORMAT_ENV, "").strip().lower() == "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, component, logger, request_id, model, message (, exc)."""

    def __init__(self, component: str, model: str | None = None) -> None:
        super().__init__()
        self.component = component
        self.model = model

    def format(self, record: logging.LogRecord) -> str:
        ctx = current.get()
        thread_ids = getattr(_thread, "ids", None) or (None, None)
        rid = getattr(record, "request_id", None) or (ctx.request_id if ctx else None) or thread_ids[0]
        model = getattr(record, "model", None) or (ctx.model if ctx else None) or thread_ids[1] or self.model
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "component": self.component,
            "logger": record.name,
            "request_id": rid,
            "model": model,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(component: str, model: str | None = None, level: int = logging.INFO,
                      text_format: str | None = None) -> bool:
    """JSON lines on the root logger when ``VLMSERVE_LOG_FORMAT=json`` (True), else ``text_format`` when given
    (the caller's plain format), else nothing changes (False). Uvicorn's own loggers write through the root."""
    root = logging.getLogger()
    if json_logs():
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter(component, model))
        root.handlers[:] = [handler]
        root.setLevel(level)
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).handlers[:] = []
            logging.getLogger(name).propagate = True
        return True
    if text_format is not None:
        logging.basicConfig(level=level, format=text_format)
    return False


# ---------------------------------------------------------------------------------------------- OpenTelemetry

_providers: dict[str, Any] = {}
_lock = threading.Lock()


def otlp_endpoint() -> str | None:
    value = os.environ.get(OTLP_ENDPOINT_ENV, "").strip()
    return value.rstrip("/") or None


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector base URL (``http://host:4318`` -> ``.../v1/traces``)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def tracer(component: str) -> Any | None:
    """The tracer of ``component`` (service ``vlmserve-<component>``), None when tracing is off.

    One SDK provider per component and process, exporting in batches to the OTLP endpoint.
    """
    endpoint = otlp_endpoint()
    if endpoint is None:
        return None
    with _lock:
        provider = _providers.get(component)
        if provider is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider(resource=Resource.create({"service.name": f"vlmserve-{component}"}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
            _providers[component] = provider
    return provider.get_tracer(f"vlmserve.{component}")


def shutdown() -> None:
    """Flush and stop every provider (end of a process)."""
    with _lock:
        for provider in _providers.values():
            provider.shutdown()
        _providers.clear()


def valid_traceparent(value: str | None) -> str | None:
    if value and _TRACEPARENT_RE.match(value.strip().lower()):
        return value.strip().lower()
    return None


def context_from(traceparent: str | None) -> Any | None:
    """An OpenTelemetry context whose parent is ``traceparent`` (None when absent or malformed)."""
    tp = valid_traceparent(traceparent)
    if tp is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({TRACEPARENT: tp})


def traceparent_of(span: Any) -> str | None:
    """The W3C ``traceparent`` naming ``span`` (for the next hop)."""
    sc = span.get_span_context() if span is not None else None
    if sc is None or not sc.is_valid:
        return None
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The ``traceparent`` of the span current in this context, None when tracing is off."""
    if otlp_endpoint() is None:
        return None
    from opentelemetry import trace

    return traceparent_of(trace.get_current_span())


@contextmanager
def span(component: str, name: str, parent: str | None = None, **attributes: Any) -> Iterator[Any]:
    """A span (current inside) of ``component``, child of ``parent`` (a traceparent) or of the current span;
    yields None when tracing is off."""
    t = tracer(component)
    if t is None:
        yield None
        return
    ctx = context_from(parent) if parent else None
    with t.start_as_current_span(name, context=ctx,
                                 attributes={k: v for k, v in attributes.items() if v is not None}) as s:
        yield s


def start_span(component: str, name: str, **attributes: Any) -> Any | None:
    """A span, child of the current one, that is not made current (the caller ends it with :func:`end_span`);
    None when tracing is off."""
    t = tracer(component)
    if t is None:
        return None
    return t.start_span(name, attributes={k: v for k, v in attributes.items() if v is not None})


def end_span(span: Any | None, outcome: str | None = None) -> None:
    if span is None or not span.is_recording():
        return
    if outcome is not None:
        span.set_attribute("vlmserve.outcome", outcome)
    span.end()


def record_span(component: str, name: str, parent: str | None, start_s: float, end_s: float,
                **attributes: Any) -> str | None:
    """A finished span from wall-clock times (``time.time()`` seconds), child of ``parent``; returns its
    traceparent (None when tracing is off or there is no parent). For work measured before it is reported (a
    chat request's queue wait, prefill and decode, timed by the engine thread)."""
    t = tracer(component)
    ctx = context_from(parent)
    if t is None or ctx is None:
        return None
    s = t.start_span(name, context=ctx, start_time=int(start_s * 1e9),
                     attributes={k: v for k, v in attributes.items() if v is not None})
    s.end(end_time=int(max(end_s, start_s) * 1e9))
    return traceparent_of(s)
