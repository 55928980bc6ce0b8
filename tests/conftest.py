"""Shared fixtures: the tiny model repository, built once per test session into a temporary state dir."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.ports import free_port

__all__ = ["compose_commands", "free_port"]


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


@pytest.fixture(scope="session")
def tiny_repo(state_dir: Path) -> Path:
    """A freshly exported tiny repository (the real export code path, quiet)."""
    from export.progress import Progress
    from export.run import export_model_set

    repo = state_dir / "repository" / "tiny"
    export_model_set("tiny", repo=repo, progress=Progress(quiet=True))
    return repo
