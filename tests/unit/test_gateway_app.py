"""Gateway behaviour that needs no model: errors, auth, limits, Triton down (a real closed port)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from tests.conftest import free_port
from vlmserve.gateway.app import create_app
from vlmserve.gateway.settings import GatewaySettings


@pytest.fixture
def client_factory():
    clients = []

    def make(**overrides) -> TestClient:
        settings = GatewaySettings(triton_url=f"127.0.0.1:{free_port()}", **overrides)  # nothing listens there
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_gateway_never_imports_torch() -> None:
    code = "import sys, vlmserve.gateway.app, vlmserve.gateway.__main__; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_triton_down_gives_503_with_retry_after(client_factory) -> None:
    client = client_factory()
    r = client.post("/embed_text", json={"texts": ["hello"]})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"
    assert r.json()["error"]["type"] == "service_unavailable"
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert client.get("/livez").status_code == 200


def test_validation_errors_are_422_in_one_schema(client_factory) -> None:
    client = client_factory()
    r = client.post("/embed", json={"pictures": []})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "images" in err["message"]
    r = client.post("/embed_text", json={})
    assert r.status_code == 422 and "'texts'" in r.json()["error"]["message"]
    r = client.post("/embed", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"})
    assert r.status_code == 422 and "encoding_format" in r.json()["error"]["message"]


def test_oversize_body_is_413(client_factory) -> None:
    client = client_factory(max_body_bytes=1000)
    r = client.post("/embed_text", json={"texts": ["x" * 5000]})
    assert r.status_code == 413 and "larger than 1000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced on the bytes received
        for _ in range(10):
            yield b"x" * 500

    r = client.post("/embed_text", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_keys(client_factory) -> None:
    client = client_factory(api_keys=["s3cret"])
    assert client.post("/embed_text", json={"text": "a"}).status_code == 401
    r = client.post("/embed_text", json={"text": "a"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # A valid key gets through auth (and then meets the unreachable Triton).
    r = client.post("/embed_text", json={"text": "a"}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 503
    assert client.get("/health").status_code == 503  # /health stays open (no 401)
    assert client.get("/v1/models").status_code == 401


def test_unknown_route_uses_error_schema(client_factory) -> None:
    r = client_factory().get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_metrics_count_requests_by_route(client_factory) -> None:
    client = client_factory()
    client.post("/embed_text", json={"texts": ["a"]})
    text = client.get("/metrics").text
    assert 'vlmserve_requests_total{method="POST",route="/embed_text",status="503"} 1.0' in text
    assert 'vlmserve_errors_total{model="-",route="/embed_text",status="503"} 1.0' in text


def test_openapi_names_each_api_by_what_it_is(offline_gateway) -> None:
    """The OpenAPI tags and texts name the APIs (the Florence-2 service API, ...), never an internal file name."""
    schema = offline_gateway.get("/openapi.json").json()
    tags = {tag for path in schema["paths"].values() for op in path.values() for tag in op.get("tags", [])}
    assert {"Florence-2 service API", "OCR service API", "SmolVLM2 service API", "embedding service API"} <= tags
    assert not re.search(r"seeds? ?0\d\d|seed[- ]compatible|seed (api|route)", json.dumps(schema), re.IGNORECASE)
