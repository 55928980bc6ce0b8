"""Fixtures of the gateway's unit tests: an app on the typed fake engine (in process, or a real uvicorn)."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from tests.conftest import free_port, local_http_server
from tests.fakes import FakeEngine
from tests.unit.gateway.chat_support import MP4, chat_backend, check_chat_calls, png_bytes
from vlmserve.gateway.app import create_app
from vlmserve.gateway.settings import GatewaySettings


@pytest.fixture
def make_client(tmp_path) -> Iterator[Any]:
    clients: list[TestClient] = []

    backends: list[FakeEngine] = []

    def make(backend: FakeEngine | None = None, **overrides: Any) -> tuple[TestClient, FakeEngine]:
        backend = backend or chat_backend()
        overrides.setdefault("storage_dir", str(tmp_path / "storage"))
        client = TestClient(create_app(GatewaySettings(**overrides), backend=backend), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        backends.append(backend)
        return client, backend

    yield make
    for c in clients:
        c.__exit__(None, None, None)
    for b in backends:
        check_chat_calls(b)


@pytest.fixture
def live_server(tmp_path) -> Iterator[Any]:
    """A real uvicorn on a free port (for the openai SDK and real client disconnects)."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []
    backends: list[FakeEngine] = []

    def start(backend: FakeEngine) -> str:
        settings = GatewaySettings(storage_dir=str(tmp_path / "storage"))
        port = free_port()
        backends.append(backend)
        server = uvicorn.Server(uvicorn.Config(create_app(settings, backend=backend),
                                               host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)
    for b in backends:
        check_chat_calls(b)


@pytest.fixture
def png_server() -> Iterator[str]:
    """A local HTTP server (127.0.0.1: loopback, so refused unless allowlisted) serving a PNG and an MP4."""
    files = {"/a.png": (png_bytes(), "image/png"), "/v.mp4": (MP4, "video/mp4")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body, kind = files.get(self.path, (b"", "text/plain"))
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with local_http_server(Handler) as port:
        yield f"http://127.0.0.1:{port}"
