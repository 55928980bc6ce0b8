"""Locating and preparing the wheel's tritonserver; the command line it gets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from vlmserve.orchestrator import ports, triton
from vlmserve.orchestrator.ports import free_port
from vlmserve.orchestrator.settings import OrchestratorSettings


def test_find_and_prepare_tritonserver(tmp_path: Path) -> None:
    dist = triton.find_tritonserver()
    assert os.access(dist.binary, os.X_OK)
    backends = triton.prepare_backends(dist, tmp_path)
    stub = backends / "python" / "triton_python_backend_stub"
    assert stub.read_bytes() == dist.stub().read_bytes()
    assert (backends / "python" / "libtriton_python.so").exists()
    mtime = stub.stat().st_mtime_ns
    triton.prepare_backends(dist, tmp_path)  # second call reuses the prepared copy
    assert stub.stat().st_mtime_ns == mtime


def test_triton_command_uses_configured_ports_and_embedded_configs(tmp_path: Path) -> None:
    s = OrchestratorSettings(http_port=9100, grpc_port=9101, metrics_port=9102, repository=tmp_path)
    dist = triton.find_tritonserver()
    cmd = triton.triton_command(s, dist, tmp_path / "backends")
    for flag in ("--http-port=9100", "--grpc-port=9101", "--metrics-port=9102", "--http-address=127.0.0.1",
                 "--model-config-name=embedded", f"--model-repository={tmp_path.resolve()}"):
        assert flag in cmd
    env = triton.triton_env(dist)
    assert str(dist.libs) in env["LD_LIBRARY_PATH"]


def test_settings_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("VLMSERVE_GATEWAY_PORT", "9999")
    monkeypatch.setenv("VLMSERVE_MODEL_SET", "hub")
    s = OrchestratorSettings()
    assert s.gateway_port == 9999 and s.repository_path.name == "hub"


def test_ports_must_be_distinct(tmp_path):
    with pytest.raises(ValueError, match="metrics_port and http_port are both 9100"):
        OrchestratorSettings(http_port=9100, grpc_port=9101, metrics_port=9100, repository=tmp_path)
    with pytest.raises(ValueError, match="gateway_port and grpc_port"):
        OrchestratorSettings(grpc_port=9101, gateway_port=9101, repository=tmp_path)
    # The gateway on another address may reuse a Triton port number.
    OrchestratorSettings(grpc_port=9101, gateway_port=9101, gateway_host="0.0.0.0", repository=tmp_path)


def test_free_port_never_repeats_a_port_the_kernel_gives_twice(monkeypatch):
    # The kernel's bind(0) answers are scripted: the same port twice in a row (what failed a CI run), then another.
    answers = iter([1, 1, 2])

    class Socket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            assert address == ("127.0.0.1", 0)

        def getsockname(self):
            return ("127.0.0.1", next(answers))

    monkeypatch.setattr(ports.socket, "socket", Socket)
    assert [free_port(), free_port()] == [1, 2]


def test_free_port_gives_distinct_bindable_ports():
    given = [free_port() for _ in range(50)]
    assert len(set(given)) == len(given)
    for port in given[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when handed out


def test_stack_ports_reach_the_settings_through_the_environment(monkeypatch, tmp_path):
    given = ports.stack_ports()
    assert len(set(given.values())) == 4
    for key, value in ports.stack_port_env(given).items():
        monkeypatch.setenv(key, value)
    s = OrchestratorSettings(repository=tmp_path)
    assert (s.http_port, s.grpc_port, s.metrics_port, s.gateway_port) == (
        given["http_port"], given["grpc_port"], given["metrics_port"], given["gateway_port"])
