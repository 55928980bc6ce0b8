"""Request ids, JSON log lines and the tracing helpers (issue 26); the real stack's trace: tests/integration."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import free_port
from vlmserve import telemetry
from vlmserve.gateway.app import create_app
from vlmserve.gateway.backends.triton import TritonBackend
from vlmserve.gateway.settings import GatewaySettings


@pytest.fixture
def client(offline_gateway):
    return offline_gateway


def test_every_response_carries_a_request_id(client) -> None:
    r = client.get("/livez")
    rid = r.headers["x-request-id"]
    assert len(rid) == 32 and int(rid, 16) >= 0  # uuid4 hex
    assert client.get("/livez").headers["x-request-id"] != rid  # one per request


def test_the_clients_request_id_comes_back_and_a_bad_one_is_replaced(client) -> None:
    assert client.get("/livez", headers={"X-Request-ID": "abc-123.x:1"}).headers["x-request-id"] == "abc-123.x:1"
    for bad in ("has space", "x" * 129, "new\nline", "{json}"):
        rid = client.get("/livez", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert rid != bad and len(rid) == 32


def test_error_bodies_carry_the_request_id(client) -> None:
    r = client.post("/embed_text", json={}, headers={"X-Request-ID": "req-422"})  # validation error
    assert r.status_code == 422 and r.json()["error"]["request_id"] == "req-422"
    assert r.headers["x-request-id"] == "req-422"
    r = client.post("/embed_text", json={"texts": ["hi"]}, headers={"X-Request-ID": "req-503"})  # Triton down
    assert r.status_code == 503 and r.json()["error"]["request_id"] == "req-503"
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["request_id"] == r.headers["x-request-id"]


def test_an_unhandled_error_still_carries_the_request_id() -> None:
    app = create_app(GatewaySettings(triton_url=f"127.0.0.1:{free_port()}"))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "req-500" and r.json()["error"]["request_id"] == "req-500"


def test_error_body_outside_a_request_has_no_request_id() -> None:
    from vlmserve.gateway.errors import error_body

    assert "request_id" not in error_body(400, "x")["error"]


class _RecordingClient:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def infer(self, model: str, inputs: list, **kwargs: Any) -> Any:
        self.calls.append(kwargs)

        class Result:
            def as_numpy(self, name: str) -> np.ndarray:
                return np.zeros(1, np.float32)

        return Result()

    async def close(self) -> None:
        pass


def test_triton_calls_carry_the_request_id_then_numbered_ids() -> None:
    async def scenario() -> list[dict[str, Any]]:
        backend = TritonBackend("127.0.0.1:1", grpc_url="127.0.0.1:2")
        fake = _RecordingClient()
        backend._client, backend._client_at = fake, backend.clock()  # type: ignore[assignment]
        telemetry.current.set(telemetry.RequestContext("rid7"))
        for _ in range(3):
            await backend.infer("m", {"X": np.zeros((1, 2), np.float32)}, ["Y"])
        telemetry.current.set(None)
        await backend.infer("m", {"X": np.zeros((1, 2), np.float32)}, ["Y"])  # outside a request: a fresh id
        return fake.calls

    calls = asyncio.run(scenario())
    assert [c["request_id"] for c in calls[:3]] == ["rid7", "rid7-2", "rid7-3"]
    assert len(calls[3]["request_id"]) == 32
    # Tracing off (no VLMSERVE_OTLP_ENDPOINT): no traceparent header nor parameter.
    assert all(c["headers"] is None and c["parameters"] is None for c in calls)


def test_json_log_lines_carry_request_id_and_model(monkeypatch) -> None:
    monkeypatch.setenv(telemetry.LOG_FORMAT_ENV, "json")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(telemetry.JsonFormatter("gateway"))
    logger = logging.getLogger("vlmserve.test.observability")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        token = telemetry.current.set(telemetry.RequestContext("rid-json", model="smolvlm2"))
        logger.info("served %d items", 3)
        telemetry.current.reset(token)
        with telemetry.log_context("rid-thread", "siglip_vision"):  # the Triton models' threads
            logger.warning("slow")
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("failed", extra={"request_id": "rid-extra"})
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    assert lines[0]["request_id"] == "rid-json" and lines[0]["model"] == "smolvlm2"
    assert lines[0]["message"] == "served 3 items" and lines[0]["level"] == "INFO"
    assert lines[0]["component"] == "gateway" and lines[0]["time"].endswith("Z")
    assert lines[1]["request_id"] == "rid-thread" and lines[1]["model"] == "siglip_vision"
    assert lines[2]["request_id"] == "rid-extra" and "ValueError: bad" in lines[2]["exc"]


def test_tracing_is_off_without_the_endpoint(monkeypatch) -> None:
    monkeypatch.delenv(telemetry.OTLP_ENDPOINT_ENV, raising=False)
    assert telemetry.tracer("gateway") is None
    with telemetry.span("gateway", "x") as s:
        assert s is None
    assert telemetry.current_traceparent() is None
    assert telemetry.record_span("model", "x", "00-" + "1" * 32 + "-" + "2" * 16 + "-01", 1.0, 2.0) is None


def test_traceparent_parsing() -> None:
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert telemetry.valid_traceparent(good.upper()) == good
    for bad in (None, "", "01-xyz", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"):
        assert telemetry.valid_traceparent(bad) is None
    assert telemetry.traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert telemetry.traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


def test_spans_join_the_clients_trace(monkeypatch) -> None:
    """With the SDK exporting in memory: the gateway's request span is a child of the client's traceparent,
    and the Triton call's span (and the traceparent it sends) are its children."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setenv(telemetry.OTLP_ENDPOINT_ENV, "http://127.0.0.1:9")
    monkeypatch.setitem(telemetry._providers, "gateway", provider)
    fake = _RecordingClient()

    class Backend(TritonBackend):
        async def registry(self, refresh: bool = False):  # type: ignore[override]
            from vlmserve.gateway.engines import ModelInfo, Registry

            return Registry({"siglip_embed_text": ModelInfo.of("siglip_embed_text", True, {
                "family": "siglip", "task": "embed_text", "source_model": "tiny"}, 8)})

    backend = Backend("127.0.0.1:1", grpc_url="127.0.0.1:2")
    backend._client, backend._client_at = fake, backend.clock()  # type: ignore[assignment]
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with TestClient(create_app(GatewaySettings(), backend=backend), raise_server_exceptions=False) as c:
        c.post("/embed_text", json={"texts": ["secret prompt"]}, headers={"traceparent": parent})
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request = spans["POST /embed_text"]
    assert request.parent is not None and request.parent.span_id == 0xb7ad6b7169203331
    assert f"{request.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    call = spans["triton.infer siglip_embed_text"]
    assert call.parent is not None and call.parent.span_id == request.context.span_id
    sent = fake.calls[0]["headers"]["traceparent"]
    assert sent == telemetry.traceparent_of(call) == fake.calls[0]["parameters"]["traceparent"]
    assert request.attributes["vlmserve.model"] == "siglip_embed_text"
    assert all("secret" not in str(v) for s in spans.values() for v in s.attributes.values())


def _memory_provider(monkeypatch, component: str):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setenv(telemetry.OTLP_ENDPOINT_ENV, "http://127.0.0.1:9")
    monkeypatch.setitem(telemetry._providers, component, provider)
    return exporter


PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Request:
    def __init__(self, context: Any = None, parameters: str = "{}") -> None:
        self.context = context
        self.params = parameters

    def trace(self) -> Any:
        request = self

        class Trace:
            def get_context(self) -> Any:
                return request.context

        return Trace()

    def parameters(self) -> str:
        return self.params

    def request_id(self) -> str:
        return "rid-model"


def test_a_models_parent_is_tritons_context_else_the_gateways_parameter(monkeypatch) -> None:
    from vlmserve.model_repository import common

    other = "00-11111111111111111111111111111111-2222222222222222-01"
    monkeypatch.delenv(telemetry.OTLP_ENDPOINT_ENV, raising=False)
    assert common.request_traceparent(_Request(json.dumps({"traceparent": PARENT}))) is None  # tracing off
    monkeypatch.setenv(telemetry.OTLP_ENDPOINT_ENV, "http://127.0.0.1:9")
    assert common.request_traceparent(_Request(json.dumps({"traceparent": PARENT}),
                                                json.dumps({"traceparent": other}))) == PARENT
    assert common.request_traceparent(_Request(None, json.dumps({"traceparent": other}))) == other
    assert common.request_traceparent(_Request("", json.dumps({"traceparent": "junk"}))) is None
    assert common.request_traceparent(_Request(PARENT)) == PARENT  # a bare traceparent


def test_a_chat_requests_timeline_becomes_its_spans(monkeypatch) -> None:
    from vlmserve.model_repository import common
    from vlmserve.model_repository.chat import RequestTrace

    monkeypatch.setattr(common, "MODEL_NAME", "smolvlm2")
    exporter = _memory_provider(monkeypatch, "smolvlm2")
    trace = RequestTrace("rid-chat", PARENT, received=100.0, queued=100.5)
    trace.first_output = 102.0
    monkeypatch.setattr("time.time", lambda: 103.0)
    trace.finish(101.0, {"prompt_tokens": 7, "completion_tokens": 3, "batch_size": 2}, "stop", 1)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["chat request"]
    assert root.parent is not None and root.parent.span_id == 0xb7ad6b7169203331
    assert root.attributes["vlmserve.request_id"] == "rid-chat" and root.attributes["vlmserve.completion_tokens"] == 3
    expected = {"chat prepare": (100.0, 100.5), "chat queue": (100.5, 101.0), "chat prefill": (101.0, 102.0),
                "chat decode": (102.0, 103.0)}
    for name, (start, end) in expected.items():
        span = spans[name]
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert (span.start_time, span.end_time) == (int(start * 1e9), int(end * 1e9))


def test_the_orchestrator_turns_tracing_on_in_triton_gateway_and_manifests() -> None:
    from vlmserve.orchestrator import triton
    from vlmserve.orchestrator.deploy import k8s, spec
    from vlmserve.orchestrator.launcher import observability_env
    from vlmserve.orchestrator.settings import OrchestratorSettings

    assert triton.trace_args(None) == [] and triton.trace_args("") == []
    args = triton.trace_args("http://collector:4318")
    assert "--trace-config=mode=opentelemetry" in args and "--trace-config=rate=1" in args
    assert "--trace-config=opentelemetry,url=http://collector:4318/v1/traces" in args
    assert observability_env(OrchestratorSettings(otlp_endpoint="http://c:4318")) == {
        telemetry.OTLP_ENDPOINT_ENV: "http://c:4318"}
    assert observability_env(OrchestratorSettings(otlp_endpoint=None)) == {}
    for doc in k8s.render(spec.prepare("cpu")):
        if doc["kind"] == "Deployment":
            env = {e["name"]: e for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
            ref = env[telemetry.OTLP_ENDPOINT_ENV]["valueFrom"]["configMapKeyRef"]
            assert ref == {"name": k8s.OBSERVABILITY_CONFIGMAP, "key": "otlp_endpoint", "optional": True}
