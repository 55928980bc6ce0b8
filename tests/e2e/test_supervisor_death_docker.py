"""The docker runtime: containers are nobody's children, so `vlmserve up --runtime docker` ties what it starts to
a watchdog until both are healthy. SIGKILLed mid-start (its Triton container created, not yet ready), it leaves
no container or network of its project behind within 10 s. (A successful `up` releases them to Docker's
supervision: test_docker_runtime.py uses the stack after `up` has returned.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.docker_runtime import PROJECT_LABEL
from orchestrator.images import LABEL
from orchestrator.ports import stack_port_env, stack_ports

pytestmark = pytest.mark.e2e


def ours(docker_client, project: str) -> list[str]:
    filters = {"label": [f"{LABEL}=true", f"{PROJECT_LABEL}={project}"]}
    return ([f"container {c.name}" for c in docker_client.containers.list(all=True, filters=filters)]
            + [f"network {n.name}" for n in docker_client.networks.list(filters=filters)])


def test_sigkill_of_up_mid_start_leaves_no_container(docker_client, cpu_image: str, tiny_repo: Path,
                                                    tmp_path: Path) -> None:
    project = f"vlmserve-e2e-death-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, VLMSERVE_STATE_DIR=str(tmp_path / "state"), VLMSERVE_REPOSITORY=str(tiny_repo),
               VLMSERVE_PROJECT=project, VLMSERVE_IMAGE=cpu_image, VLMSERVE_RUNTIME="docker",
               **stack_port_env(stack_ports()))
    cli = [sys.executable, "-m", "orchestrator"]
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
        deadline = time.monotonic() + 10
        while ours(docker_client, project) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not ours(docker_client, project), "left behind 10 s after SIGKILL of `up`"
    finally:
        if up.poll() is None:
            up.kill()
        subprocess.run([*cli, "clean", "--runtime", "docker"], env=env, capture_output=True, timeout=300)
