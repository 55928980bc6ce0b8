"""Shared fixtures: the tiny model repository, built once per test session into a temporary state dir, and the
real stack on it (tritonserver + gateway, process launcher) that the integration and browser tests share: one per
session, because a second one on the same state dir would refuse to start ("already running")."""

from __future__ import annotations

import http.server
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlmserve.orchestrator.launchers.process import ProcessLauncher
from vlmserve.orchestrator.ports import free_port, stack_ports
from vlmserve.orchestrator.settings import OrchestratorSettings

__all__ = ["Stack", "compose_commands", "free_port", "local_http_server", "tiny_export_options"]


@contextmanager
def local_http_server(handler: type[http.server.BaseHTTPRequestHandler],
                      tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """A threaded HTTP (or, with ``tls``, HTTPS) server on 127.0.0.1 in the background; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def compose_commands() -> list[list[str]]:
    """The Docker Compose commands installed here: the `docker compose` plugin first, then Debian's v1."""
    found = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        found.append([docker, "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vlmserve-home")
    os.environ["VLMSERVE_HOME"] = str(path)
    return path


def tiny_export_options():
    """The options of the session's tiny export (SmolVLM2's engine asked for, see ``tiny_repo``)."""
    from vlmserve.export import llamacpp
    from vlmserve.export.repository import ExportOptions

    return ExportOptions(chat_engine="llamacpp" if llamacpp.bindings_version() or os.environ.get("CI") else "torch")


@pytest.fixture(scope="session")
def tiny_repo(state_dir: Path) -> Path:
    """A freshly exported tiny repository (the real export code path, quiet). SmolVLM2 decodes with llama.cpp
    where its bindings are installed (CI builds them: ``make llamacpp``), asked for, not timed: the choice must not
    depend on this run's timings; Qwen2-VL keeps the torch loop, so both engines serve the integration tests."""
    from vlmserve.export.progress import Progress
    from vlmserve.export.run import export_model_set

    repo = state_dir / "repository" / "tiny"
    export_model_set("tiny", repo=repo, options=tiny_export_options(), progress=Progress(quiet=True))
    return repo


@dataclass
class Stack:
    gateway: str
    triton_http: str
    triton_grpc: str
    settings: OrchestratorSettings
    image_dir: Path
    launcher: ProcessLauncher


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """Images the gateway may read by path, and that the local HTTP server below serves."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    Image.new("RGB", (64, 48), (220, 30, 30)).save(d / "red.png")
    Image.new("RGB", (40, 40), (30, 30, 220)).save(d / "blue.jpg")
    return d


@pytest.fixture(scope="session")
def image_server(image_dir: Path):
    """An HTTP server on 127.0.0.1 serving image_dir (URL inputs; loopback is allow-listed for the gateway)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(image_dir), **kw)

        def log_message(self, *args):  # keep test output clean
            pass

    with local_http_server(Handler) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def stack(tiny_repo: Path, state_dir: Path, image_dir: Path) -> Stack:
    settings = OrchestratorSettings(
        **stack_ports(),
        repository=tiny_repo, state_dir=state_dir, ready_timeout_s=240,
    )
    launcher = ProcessLauncher(settings, log=lambda m: None)
    # Gateway settings for the test stack, set only while the processes are spawned (they inherit them),
    # so they do not leak into other tests' settings objects.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMSERVE_GATEWAY_URL_ALLOWLIST", '["127.0.0.1"]')
        mp.setenv("VLMSERVE_GATEWAY_LOCAL_IMAGE_DIR", str(image_dir))
        mp.setenv("VLMSERVE_GATEWAY_MAX_BODY_BYTES", str(4 * 1024 * 1024))
        mp.setenv("VLMSERVE_GATEWAY_BATCH_MAX_FILE_BYTES", str(1024 * 1024))
        launcher.start()
    services = dict(launcher.services)
    yield Stack(settings.gateway_url, settings.triton_http_url, f"{settings.host}:{settings.grpc_port}",
                settings, image_dir, launcher)
    launcher.stop()
    leftovers = [s.name for s in services.values() if s.alive()]
    assert not leftovers, f"processes left running after stop: {leftovers}"

