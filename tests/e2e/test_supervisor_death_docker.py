"""The docker launcher: containers are nobody's children, so what starts them ties them to a watchdog.
`vlmserve run --launcher docker` SIGKILLed while serving, and `vlmserve up --launcher docker` SIGKILLed mid-start
(its Triton container created, not yet ready), leave no container or network of their project behind within
10 s. (A successful `up` releases them to Docker's supervision: test_docker_launcher.py uses the stack after `up`
has returned.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from vlmserve.orchestrator.images import LABEL
from vlmserve.orchestrator.launchers.docker import PROJECT_LABEL
from vlmserve.orchestrator.ports import StackPorts, stack_port_env, stack_ports

pytestmark = pytest.mark.e2e


def ours(docker_client, project: str) -> list[str]:
    filters = {"label": [f"{LABEL}=true", f"{PROJECT_LABEL}={project}"]}
    return ([f"container {c.name}" for c in docker_client.containers.list(all=True, filters=filters)]
            + [f"network {n.name}" for n in docker_client.networks.list(filters=filters)])


def docker_env(cpu_image: str, tiny_repo: Path, tmp_path: Path, ports: StackPorts) -> tuple[str, dict[str, str]]:
    project = f"vlmserve-e2e-death-{uuid.uuid4().hex[:6]}"
    return project, dict(os.environ, VLMSERVE_STATE_DIR=str(tmp_path / "state"), VLMSERVE_REPOSITORY=str(tiny_repo),
                         VLMSERVE_PROJECT=project, VLMSERVE_IMAGE=cpu_image, VLMSERVE_LAUNCHER="docker",
                         **stack_port_env(ports))


def assert_nothing_left_within_10s(docker_client, project: str) -> None:
    deadline = time.monotonic() + 10
    while ours(docker_client, project) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ours(docker_client, project), "left behind 10 s after the SIGKILL"


CLI = [sys.executable, "-m", "vlmserve.orchestrator"]


def test_sigkill_of_run_removes_its_containers(docker_client, cpu_image: str, tiny_repo: Path,
                                               tmp_path: Path) -> None:
    ports = stack_ports()
    project, env = docker_env(cpu_image, tiny_repo, tmp_path, ports)
    log = tmp_path / "run.out"
    with open(log, "w") as out:
        run = subprocess.Popen([*CLI, "run", "--launcher", "docker", "--accelerator", "cpu"], env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while "press Ctrl-C to stop" not in log.read_text():
            assert run.poll() is None, f"run ended:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving after 400s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{ports['gateway_port']}/livez", timeout=10).status_code == 200
        assert len(ours(docker_client, project)) == 3  # two containers and the network
        run.kill()
        run.wait(timeout=30)
        assert_nothing_left_within_10s(docker_client, project)
    finally:
        if run.poll() is None:
            run.kill()
        subprocess.run([*CLI, "clean", "--launcher", "docker"], env=env, capture_output=True, timeout=300)


def test_sigkill_of_up_mid_start_leaves_no_container(docker_client, cpu_image: str, tiny_repo: Path,
                                                    tmp_path: Path) -> None:
    project, env = docker_env(cpu_image, tiny_repo, tmp_path, stack_ports())
    cli = CLI
    log = tmp_path / "up.out"
    with open(log, "w") as out:
        up = subprocess.Popen([*cli, "up", "--accelerator", "cpu"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not any(name.startswith("container") for name in ours(docker_client, project)):
            assert up.poll() is None, f"up ended before its first container existed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no container after 300s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        up.kill()
        up.wait(timeout=30)
        assert up.returncode == -9, f"up finished before the kill:\n{log.read_text()[-3000:]}"
        assert_nothing_left_within_10s(docker_client, project)
    finally:
        if up.poll() is None:
            up.kill()
        subprocess.run([*cli, "clean", "--launcher", "docker"], env=env, capture_output=True, timeout=300)
