"""The docker launcher on a real Docker Engine, driven through the CLI as a user would:
up -> healthy -> /embed through the container -> status/logs show it -> Triton killed inside the container ->
Docker restarts it and /embed answers again -> down/clean leave nothing of ours behind (and nothing else is
touched)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker.errors
import httpx
import pytest

from vlmserve.orchestrator.images import LABEL
from vlmserve.orchestrator.launchers.docker import PROJECT_LABEL
from vlmserve.orchestrator.ports import stack_port_env, stack_ports

pytestmark = pytest.mark.e2e

KILL_TRITON = (
    "import os, signal\n"
    "for p in filter(str.isdigit, os.listdir('/proc')):\n"
    "    try:\n"
    "        if open(f'/proc/{p}/comm').read().strip() == 'tritonserver':\n"
    "            os.kill(int(p), signal.SIGKILL); print('killed', p)\n"
    "    except OSError:\n"
    "        pass\n"
)


def cli(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmserve.orchestrator", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def embed(gateway: str, image: bytes) -> list[list[float]]:
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    r = httpx.post(f"{gateway}/embed", json={"images": [uri]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def ours(docker_client, project: str) -> list[str]:
    filters = {"label": [f"{LABEL}=true", f"{PROJECT_LABEL}={project}"]}
    return ([f"container {c.name}" for c in docker_client.containers.list(all=True, filters=filters)]
            + [f"network {n.name}" for n in docker_client.networks.list(filters=filters)])


def test_docker_lifecycle(docker_client, cpu_image: str, tiny_repo: Path, tmp_path: Path, sample_image: Path):
    project = f"vlmserve-e2e-{uuid.uuid4().hex[:6]}"
    ports = stack_ports()
    env = dict(os.environ, VLMSERVE_STATE_DIR=str(tmp_path / "state"), VLMSERVE_REPOSITORY=str(tiny_repo),
               VLMSERVE_PROJECT=project, VLMSERVE_IMAGE=cpu_image, VLMSERVE_LAUNCHER="docker",
               **stack_port_env(ports))
    gateway = f"http://127.0.0.1:{ports['gateway_port']}"
    # A container that is not ours: clean must leave it alone.
    bystander = docker_client.containers.create(cpu_image, command=["health"], name=f"{project}-bystander")
    try:
        up = cli(env, "up", "--accelerator", "cpu")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "vlmserve is up (docker)" in up.stderr

        vectors = embed(gateway, sample_image.read_bytes())
        assert len(vectors) == 1 and len(vectors[0]) > 8

        status = cli(env, "status", "--launcher", "docker", "--json")
        assert status.returncode == 0, status.stderr
        rows = {r["service"]: r for r in json.loads(status.stdout)["services"]}
        assert set(rows) == {"triton", "gateway"}
        for row in rows.values():
            assert row["launcher"] == "docker" and row["state"] == "running", row
            assert row["device"] == "cpu" and ("MiB" in row["memory"] or "GiB" in row["memory"]), row
        assert f"127.0.0.1:{ports['gateway_port']}->8080" in rows["gateway"]["ports"]
        table = cli(env, "status", "--launcher", "docker")
        assert f"{project}" in table.stdout or "triton" in table.stdout, table.stdout

        logs = cli(env, "logs", "triton", "--launcher", "docker", "--tail", "200")
        assert logs.returncode == 0, logs.stderr
        assert "siglip_embed_image" in logs.stdout and "Started HTTPService" in logs.stdout, logs.stdout[-2000:]

        # Kill Triton inside its container; the container's init exits with it and Docker restarts it.
        triton = docker_client.containers.get(f"{project}-triton")
        started_at = triton.attrs["State"]["StartedAt"]
        # The exec may die with the container before its output is read (an empty answer, exit 137): the proof
        # that Triton was killed is the container being started again, checked below, not the exec's output.
        with contextlib.suppress(docker.errors.APIError):
            triton.exec_run(["python", "-c", KILL_TRITON])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            triton.reload()
            if triton.attrs["RestartCount"] >= 1 and triton.attrs["State"]["StartedAt"] != started_at:
                try:
                    embed(gateway, sample_image.read_bytes())
                    break
                except (AssertionError, httpx.HTTPError):
                    pass
            time.sleep(1)
        else:
            pytest.fail(f"triton was not restarted/answering; restarts={triton.attrs['RestartCount']}\n"
                        f"{triton.logs(tail=40).decode(errors='replace')}")
        rows = {r["service"]: r for r in json.loads(cli(env, "status", "--launcher", "docker", "--json").stdout)[
            "services"]}
        assert rows["triton"]["restarts"] >= 1 and rows["gateway"]["restarts"] == 0

        # `ensure` on a healthy stack starts nothing.
        ensure = cli(env, "ensure")
        assert ensure.returncode == 0 and "already running and healthy" in ensure.stderr, ensure.stderr

        # The gateway container drains on `docker stop`'s SIGTERM (python -m vlmserve.gateway is PID 1): with nothing in
        # progress it exits 0 at once, long before Docker's timeout would SIGKILL it (exit 137).
        gateway_container = docker_client.containers.get(f"{project}-gateway")
        stop_started = time.monotonic()
        gateway_container.stop(timeout=60)
        stop_s = time.monotonic() - stop_started
        gateway_container.reload()
        gateway_logs = gateway_container.logs(tail=50).decode(errors="replace")
        assert gateway_container.attrs["State"]["ExitCode"] == 0, gateway_logs
        assert "drained: no request in progress" in gateway_logs and stop_s < 30, (stop_s, gateway_logs)

        down = cli(env, "down", "--launcher", "docker")
        assert down.returncode == 0 and "docker triton" in down.stderr, down.stderr
        assert ours(docker_client, project) == []
        clean = cli(env, "clean", "--launcher", "docker")
        assert clean.returncode == 0, clean.stderr
        assert ours(docker_client, project) == []
        bystander.reload()  # still there: clean only removes what carries our labels
    finally:
        cli(env, "clean", "--launcher", "docker", timeout=120)
        bystander.remove(force=True)
    assert ours(docker_client, project) == []
