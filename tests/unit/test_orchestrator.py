"""Locating and preparing the wheel's tritonserver; the command line it gets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator import triton
from orchestrator.ports import free_port
from orchestrator.settings import OrchestratorSettings


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


def test_free_port_never_repeats():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
