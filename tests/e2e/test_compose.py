"""docker/compose.yaml's cpu profile on a real Docker Engine with a real Compose (the `docker compose` plugin or
Debian's docker-compose): up -> both services healthy (the compose healthchecks) -> /embed through the gateway
container -> the orchestrator's own docker launcher neither lists nor cleans the compose project -> down -v leaves
nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import compose_commands
from tests.e2e.test_docker_launcher import embed
from vlmserve import paths
from vlmserve.orchestrator.images import LABEL
from vlmserve.orchestrator.launchers.docker import PROJECT_LABEL, SERVICE_LABEL
from vlmserve.orchestrator.ports import stack_port_env, stack_ports

pytestmark = pytest.mark.e2e

COMPOSE_FILE = paths.PROJECT_ROOT / "docker" / "compose.yaml"


def compose_command() -> list[str]:
    found = compose_commands()
    if found:
        return found[0]
    if os.environ.get("CI"):
        pytest.fail("CI must provide Docker Compose (docker/engine.sh installs Debian's docker-compose)")
    pytest.skip("no Docker Compose here; `bash docker/engine.sh` installs Debian's docker-compose")


def test_compose_cpu_profile(docker_client, cpu_image: str, tiny_repo: Path, tmp_path: Path,
                             sample_image: Path) -> None:
    project = f"vlmserve-compose-e2e-{uuid.uuid4().hex[:6]}"
    volume = f"{project}-hf-cache"
    ports = stack_ports()
    cache = tmp_path / "cache"
    for profile in ("cpu", "gpu", "rocm"):  # docker-compose v1 checks every service's build context exists
        (cache / f"context-{profile}").mkdir(parents=True)
    env = dict(os.environ, VLMSERVE_CPU_IMAGE=cpu_image, VLMSERVE_REPOSITORY=str(tiny_repo),
               VLMSERVE_CACHE_DIR=str(cache), VLMSERVE_HF_CACHE_VOLUME=volume,
               **stack_port_env(ports))
    compose = [*compose_command(), "-f", str(COMPOSE_FILE), "-p", project, "--profile", "cpu"]

    def run(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=timeout)

    def project_objects() -> list[str]:
        filters = {"label": f"com.docker.compose.project={project}"}
        return ([f"container {c.name}" for c in docker_client.containers.list(all=True, filters=filters)]
                + [f"network {n.name}" for n in docker_client.networks.list(filters=filters)]
                + [f"volume {v.name}" for v in docker_client.volumes.list(filters={"name": volume})])

    try:
        up = run("up", "-d")  # returns once triton-cpu is healthy (gateway-cpu depends on it)
        assert up.returncode == 0, up.stdout + up.stderr
        containers = {c.labels[SERVICE_LABEL]: c for c in docker_client.containers.list(
            filters={"label": f"com.docker.compose.project={project}"})}
        assert set(containers) == {"triton", "gateway"}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for c in containers.values():
                c.reload()
            health = {name: c.attrs["State"]["Health"]["Status"] for name, c in containers.items()}
            if set(health.values()) == {"healthy"}:
                break
            assert "unhealthy" not in health.values(), health
            time.sleep(1)
        else:
            pytest.fail(f"compose services not healthy: {health}")
        for c in containers.values():
            assert c.labels[LABEL] == "true" and c.labels[PROJECT_LABEL] == "vlmserve-compose", c.labels
            assert c.attrs["Config"]["Image"] == cpu_image
        assert f"127.0.0.1:{ports['gateway_port']}->8080" in run("ps").stdout

        vectors = embed(f"http://127.0.0.1:{ports['gateway_port']}", sample_image.read_bytes())
        assert len(vectors) == 1 and len(vectors[0]) > 8

        # The orchestrator's docker launcher (project "vlmserve" and its own) does not see or remove compose's.
        orch_env = dict(env, VLMSERVE_STATE_DIR=str(tmp_path / "state"), VLMSERVE_PROJECT=f"{project}-orch")
        clean = subprocess.run([sys.executable, "-m", "vlmserve.orchestrator", "clean", "--launcher", "docker"],
                               env=orch_env, capture_output=True, text=True, timeout=120)
        assert clean.returncode == 0, clean.stderr
        for c in containers.values():
            c.reload()
            assert c.status == "running", c.name

        down = run("down", "-v")
        assert down.returncode == 0, down.stdout + down.stderr
        assert project_objects() == []
    finally:
        run("down", "-v", "--remove-orphans", timeout=120)
    assert project_objects() == []
