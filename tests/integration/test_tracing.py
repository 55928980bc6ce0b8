"""One request followed through the real stack (issue 26): its own small stack (one chat model, one encoder) with
``VLMSERVE_OTLP_ENDPOINT`` at an in-process OTLP/HTTP receiver (``opentelemetry-proto`` messages) and JSON logs.

- the client's ``traceparent`` starts one trace that joins the gateway's spans, Triton's own (its OpenTelemetry
  trace mode) and the Python model's (chat queue/prefill/decode; the encoder's batch);
- the JSON log lines of gateway and Triton models carry the request id, and no secret: not the API key, not the
  prompt, not the image bytes.

The span tree of the chat request is written to ``$VLMSERVE_TRACE_TREE`` when set (docs/operate.md shows one).
"""

from __future__ import annotations

import base64
import gzip
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import local_http_server
from vlmserve import telemetry
from vlmserve.orchestrator.launchers.process import ProcessLauncher
from vlmserve.orchestrator.ports import stack_ports
from vlmserve.orchestrator.settings import OrchestratorSettings

pytestmark = pytest.mark.integration

MODELS = ("smolvlm2", "smolvlm2_vision", "siglip_embed_image", "siglip_vision")
API_KEY = "sk-vlmserve-SECRET-key-4711"
PROMPT = "zebra-crossing-in-my-secret-prompt"
TRACE_ID = "5b8efff798038103d269b633813fc60c"
CLIENT_SPAN = "eee19b7ec3c1b174"


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


def _hex_ids_to_base64(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: (base64.b64encode(bytes.fromhex(v)).decode() if k in ("traceId", "spanId", "parentSpanId") and v
                    else _hex_ids_to_base64(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [_hex_ids_to_base64(v) for v in data]
    return data


class Receiver:
    """What an OTLP/HTTP collector gets: ExportTraceServiceRequest protobufs (or their JSON form) on /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.posts = 0
        self.lock = threading.Lock()

    def take(self, body: bytes, content_type: str) -> None:
        from google.protobuf import json_format
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        message = ExportTraceServiceRequest()
        if "json" in content_type:  # OTLP/JSON (Triton's exporter): ids are hex there, not protobuf-JSON base64
            json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), message)
        else:
            message.ParseFromString(body)
        found = []
        for resource_spans in message.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    attrs = {a.key: json_format.MessageToDict(a.value) for a in s.attributes}
                    found.append(Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, service,
                                      s.start_time_unix_nano, s.end_time_unix_nano,
                                      {k: next(iter(v.values()), None) for k, v in attrs.items()}))
        with self.lock:
            self.spans += found
            self.posts += 1

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                try:
                    receiver.take(body, self.headers.get("Content-Type", ""))
                    self.send_response(200)
                except Exception:  # noqa: BLE001 - a bad export is the exporter's error, not a crash here
                    self.send_response(400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@dataclass
class TracedStack:
    gateway: str
    receiver: Receiver
    run_dir: Path


@pytest.fixture(scope="module")
def traced(tiny_repo: Path, tmp_path_factory) -> Iterator[TracedStack]:
    root = tmp_path_factory.mktemp("traced")
    repo = root / "repository"
    repo.mkdir()
    for name in MODELS:
        (repo / name).symlink_to(tiny_repo / name, target_is_directory=True)
    receiver = Receiver()
    with local_http_server(receiver.handler()) as port:
        settings = OrchestratorSettings(**stack_ports(), repository=repo, state_dir=root / "state",
                                        ready_timeout_s=240, otlp_endpoint=f"http://127.0.0.1:{port}")
        launcher = ProcessLauncher(settings, log=lambda m: None)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(telemetry.LOG_FORMAT_ENV, "json")
            mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # the SDK's batch export, every 0.2 s (default 5 s)
            mp.setenv("VLMSERVE_GATEWAY_API_KEYS", json.dumps([API_KEY]))
            launcher.start()
        try:
            yield TracedStack(settings.gateway_url, receiver, settings.run_path)
        finally:
            launcher.stop()


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (20, 200, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _chat(image_b64: str, max_tokens: int) -> dict[str, Any]:
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}}
    return {"model": "smolvlm2", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}, image]}]}


def _wait_for(receiver: Receiver, trace_id: str, services: set[str], names: set[str],
              timeout: float = 60.0) -> list[Span]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = receiver.trace(trace_id)
        if services <= {s.service for s in spans} and names <= {s.name for s in spans}:
            time.sleep(1.0)  # let late batches of the same trace in (the tree below shows them all)
            return receiver.trace(trace_id)
        time.sleep(0.25)
    spans = receiver.trace(trace_id)
    pytest.fail(f"trace {trace_id}: wanted services {services} and spans {names}; got "
                f"{sorted({(s.service, s.name) for s in spans})} (all traces: "
                f"{sorted({(s.service, s.name) for s in receiver.spans})})")


def _check_tree(spans: list[Span]) -> None:
    """One tree: every span's parent is in the trace, except the gateway's root, whose parent is the client's."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent not in ids]
    assert [(r.service, r.parent) for r in roots] == [("vlmserve-gateway", CLIENT_SPAN)], \
        [(r.service, r.name, r.parent) for r in roots]


def render_tree(spans: list[Span]) -> str:
    """The trace as an indented text tree: offset from the root's start and duration, in ms."""
    children: dict[str, list[Span]] = {}
    for s in spans:
        children.setdefault(s.parent, []).append(s)
    ids = {s.span_id for s in spans}
    root = next(s for s in spans if s.parent not in ids)
    lines: list[str] = []

    def walk(span: Span, depth: int) -> None:
        offset = (span.start_ns - root.start_ns) / 1e6
        took = (span.end_ns - span.start_ns) / 1e6
        lines.append(f"{'  ' * depth}{span.name}  [{span.service}]  +{offset:.1f} ms  {took:.1f} ms")
        for child in sorted(children.get(span.span_id, []), key=lambda c: (c.start_ns, c.name)):
            walk(child, depth + 1)

    walk(root, 0)
    return "\n".join(lines)


def test_one_chat_request_is_one_trace_across_gateway_triton_and_model(traced: TracedStack) -> None:
    image = base64.b64encode(_png()).decode()
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
    r = httpx.post(f"{traced.gateway}/v1/chat/completions", timeout=120, headers={
        "Authorization": f"Bearer {API_KEY}", "X-Request-ID": "trace-chat-1", "traceparent": traceparent},
        json=_chat(image, 4))
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "trace-chat-1" and r.json()["id"] != "trace-chat-1"
    spans = _wait_for(traced.receiver, TRACE_ID, {"vlmserve-gateway", "vlmserve-triton", "vlmserve-smolvlm2"},
                      {"POST /v1/chat/completions", "gateway.image", "triton.stream smolvlm2", "chat request",
                       "chat queue", "chat prefill", "chat decode"})
    _check_tree(spans)
    by_name = {s.name: s for s in spans}
    stream = by_name["triton.stream smolvlm2"]
    triton_spans = [s for s in spans if s.service == "vlmserve-triton"]
    # Triton's spans hang from the gateway's call; the model's from Triton's (or, where Triton does not say,
    # from the gateway's call).
    assert any(s.parent == stream.span_id for s in triton_spans), [(s.name, s.parent) for s in triton_spans]
    model_root = by_name["chat request"]
    assert model_root.parent in {s.span_id for s in triton_spans} | {stream.span_id}
    assert model_root.attributes["vlmserve.request_id"] == "trace-chat-1"
    for name in ("chat prepare", "chat queue", "chat prefill", "chat decode"):
        assert by_name[name].parent == model_root.span_id
    tree = render_tree(spans)
    if os.environ.get("VLMSERVE_TRACE_TREE"):
        Path(os.environ["VLMSERVE_TRACE_TREE"]).write_text(tree + "\n")
    print(tree)


def test_an_embedding_request_traces_the_encoders_batch(traced: TracedStack) -> None:
    trace_id = "7c3e5f1a2b4d6e8f0a1b2c3d4e5f6a7b"
    r = httpx.post(f"{traced.gateway}/embed", timeout=120, json={"images": [base64.b64encode(_png()).decode()] * 2},
                   headers={"Authorization": f"Bearer {API_KEY}", "traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
    assert r.status_code == 200, r.text
    spans = _wait_for(traced.receiver, trace_id, {"vlmserve-gateway", "vlmserve-triton", "vlmserve-siglip_embed_image"},
                      {"POST /embed", "triton.infer siglip_embed_image", "siglip_embed_image encode"})
    _check_tree(spans)
    encode = next(s for s in spans if s.name == "siglip_embed_image encode")
    assert int(encode.attributes["vlmserve.batch.rows"]) == 2
    assert int(encode.attributes["vlmserve.batch.requests"]) >= 1
    assert encode.attributes["vlmserve.request_id"] == r.headers["x-request-id"]


def test_json_logs_carry_the_request_id_and_no_secret(traced: TracedStack) -> None:
    image = _png()
    b64 = base64.b64encode(image).decode()
    r = httpx.post(f"{traced.gateway}/v1/chat/completions", timeout=120, headers={
        "Authorization": f"Bearer {API_KEY}", "X-Request-ID": "log-chat-1"},
        json=_chat(b64, 3))
    assert r.status_code == 200, r.text
    refused = httpx.post(f"{traced.gateway}/v1/chat/completions", timeout=30, headers={
        "Authorization": "Bearer sk-wrong-key-0815", "X-Request-ID": "log-chat-401"},
        json={"model": "smolvlm2", "messages": [{"role": "user", "content": PROMPT}]})
    assert refused.status_code == 401 and refused.json()["error"]["request_id"] == "log-chat-401"
    gateway_log = traced.run_dir / "gateway.log"
    triton_log = traced.run_dir / "triton.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and '"log-chat-1"' not in triton_log.read_text(errors="replace"):
        time.sleep(0.25)
    gateway_lines = [json.loads(line) for line in gateway_log.read_text().splitlines() if line.startswith("{")]
    triton_lines = [json.loads(line) for line in triton_log.read_text(errors="replace").splitlines()
                    if line.startswith("{")]
    assert gateway_lines and all({"time", "level", "component", "request_id", "model", "message"} <= set(line)
                                 for line in gateway_lines + triton_lines)
    mine = [line for line in gateway_lines if line["request_id"] == "log-chat-1"]
    assert mine and any(line["model"] == "smolvlm2" for line in mine), gateway_lines[-5:]
    assert any(line["request_id"] == "log-chat-401" for line in gateway_lines)
    model_lines = [line for line in triton_lines if line["request_id"] == "log-chat-1"]
    assert model_lines and all(line["component"] == "model" and line["model"] == "smolvlm2" for line in model_lines)
    for path in (gateway_log, triton_log):
        text = path.read_text(errors="replace")
        for secret in (API_KEY, "sk-wrong-key-0815", PROMPT, b64[:40], "Bearer"):
            assert secret not in text, f"{secret[:12]}... found in {path.name}"
