"""A real Docker Engine and the vlmserve CPU image, built offline (base image from debootstrap, local wheelhouse).

Without an engine the e2e tests are skipped on a developer machine (`bash docker/engine.sh` provides one);
under CI (`CI=true`) a missing engine is an error, because .ci/run installs and starts it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from vlmserve import paths

IMAGE_TAG = "vlmserve:cpu-e2e"


@pytest.fixture(scope="session")
def docker_client():
    from vlmserve.orchestrator.launchers.docker import DockerUnavailable, docker_client

    try:
        return docker_client()
    except DockerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide a Docker Engine (docker/engine.sh): {exc}")
        pytest.skip(f"no Docker Engine here ({exc}); `bash docker/engine.sh` installs and starts one")


@pytest.fixture(scope="session")
def cpu_image(docker_client) -> str:
    """docker/Dockerfile.cpu built through the orchestrator's image builder (cached layers make repeats quick)."""
    from vlmserve.orchestrator.images import build_image

    subprocess.run(["bash", str(paths.PROJECT_ROOT / "docker" / "offline-base.sh")], check=True)
    start = time.monotonic()
    build_image(docker_client, "cpu", IMAGE_TAG, paths.cache_dir(), log=lambda m: print(f"[image] {m}"))
    print(f"[image] {IMAGE_TAG} built in {time.monotonic() - start:.0f}s")
    return IMAGE_TAG


@pytest.fixture(scope="session")
def sample_image() -> Path:
    return paths.PROJECT_ROOT / "docs" / "images" / "sample.png"
