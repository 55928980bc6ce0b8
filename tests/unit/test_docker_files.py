"""Static checks of docker/: the compose file (parsed with PyYAML, and validated by docker-compose v1 or the
`docker compose` plugin when one is installed) and the three Dockerfiles. The gpu/rocm images cannot be built here
(no registry, no GPU); these checks keep them consistent with the CPU image and the orchestrator."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import compose_commands
from vlmserve import paths
from vlmserve.model_repository import common
from vlmserve.orchestrator.images import IMAGES, LABEL
from vlmserve.orchestrator.launchers.docker import GATEWAY_PORT, PROJECT_LABEL, SERVICE_LABEL, TRITON_PORTS

DOCKER = paths.PROJECT_ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
PROFILES = ("cpu", "gpu", "rocm")
COMPOSE_PROJECT = "vlmserve-compose"
HEALTH_CMD = ["python", "-m", "vlmserve.orchestrator.container", "health"]
# The flavour each image serves by default (orchestrator/hardware.py's choices): the NGC image uses the native
# config.pbtxt files (no --model-config-name), the wheel's Python-only server the embedded ones.
CONFIG_NAME = {"cpu": "embedded", "gpu": "", "rocm": "embedded"}


# ---------------------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def profile_of(service: dict[str, Any]) -> str:
    (profile,) = service["profiles"]
    return str(profile)


def test_one_triton_and_one_gateway_per_profile(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {f"{role}-{p}" for role in ("triton", "gateway") for p in PROFILES}
    for name, service in services.items():
        role, profile = name.split("-")
        assert profile_of(service) == profile, name
        assert service["image"] == f"${{VLMSERVE_{profile.upper()}_IMAGE:-vlmserve:{profile}}}", name
        assert service["command"] == [role], name
        assert service["environment"]["VLMSERVE_ROLE"] == role, name


def test_every_service_is_supervised_labelled_and_local_only(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        role, profile = name.split("-")
        assert service["init"] is True and service["restart"] == "on-failure", name
        assert service["healthcheck"]["test"] == ["CMD", *HEALTH_CMD], name
        labels = service["labels"]
        assert labels[LABEL] == "true" and labels[PROJECT_LABEL] == COMPOSE_PROJECT, name
        assert labels[SERVICE_LABEL] == role, name
        container_ports = TRITON_PORTS.values() if role == "triton" else [GATEWAY_PORT]
        assert len(service["ports"]) == len(container_ports), name
        for spec, port in zip(service["ports"], container_ports, strict=True):
            assert spec.startswith("127.0.0.1:") and spec.endswith(f":{port}"), (name, spec)


def test_triton_mounts_the_repository_read_only_and_the_hf_cache(compose: dict[str, Any],
                                                                  services: dict[str, dict[str, Any]]) -> None:
    for profile in PROFILES:
        service = services[f"triton-{profile}"]
        (models,) = [v for v in service["volumes"] if isinstance(v, dict) and v["target"] == "/models"]
        assert models["type"] == "bind" and models["read_only"] is True
        assert models["source"].startswith("${VLMSERVE_REPOSITORY:-")
        assert "hf-cache:/hf-cache" in service["volumes"]
        assert service["shm_size"] == "1g"
        assert service["environment"]["VLMSERVE_MODEL_CONFIG_NAME"] == CONFIG_NAME[profile]
        assert service["build"]["context"].endswith(f"/context-{profile}")  # what `vlmserve image build` assembles
    # Shared with the orchestrator's docker launcher, which creates it unlabelled (compose warns on a label change).
    assert compose["volumes"]["hf-cache"]["name"] == "${VLMSERVE_HF_CACHE_VOLUME:-vlmserve-hf-cache}"
    assert "labels" not in compose["volumes"]["hf-cache"]
    # The gateway learns what is served from Triton; it gets neither the repository nor the GPU.
    for profile in PROFILES:
        gateway = services[f"gateway-{profile}"]
        assert "volumes" not in gateway and "devices" not in gateway and "deploy" not in gateway


def test_gateways_wait_for_their_healthy_triton(services: dict[str, dict[str, Any]]) -> None:
    for profile in PROFILES:
        gateway = services[f"gateway-{profile}"]
        assert gateway["depends_on"] == {f"triton-{profile}": {"condition": "service_healthy"}}
        env = gateway["environment"]
        assert env["VLMSERVE_GATEWAY_TRITON_URL"] == f"triton-{profile}:{TRITON_PORTS['http']}"
        assert env["VLMSERVE_GATEWAY_TRITON_GRPC_URL"] == f"triton-{profile}:{TRITON_PORTS['grpc']}"
        assert env["VLMSERVE_GATEWAY_HOST"] == "0.0.0.0"


def test_accelerator_access(services: dict[str, dict[str, Any]]) -> None:
    gpu = services["triton-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    rocm = services["triton-rocm"]
    assert {"/dev/kfd", "/dev/dri"} <= set(rocm["devices"])
    assert "video" in rocm["group_add"]
    assert rocm["environment"][common.ACCELERATOR_ENV] == "rocm"
    assert "devices" not in services["triton-cpu"] and "deploy" not in services["triton-cpu"]
    assert "devices" not in gpu and "deploy" not in rocm


@pytest.mark.parametrize("command", compose_commands() or [pytest.param(None, marks=pytest.mark.skip(
    reason="neither docker-compose nor the docker compose plugin is installed (the YAML checks above still ran)"))])
def test_compose_validates(command: list[str], tmp_path: Path) -> None:
    # Both tools check the build contexts (v1: every service's, whatever the profile) and the bind source.
    for profile in PROFILES:
        (tmp_path / f"context-{profile}").mkdir()
    (tmp_path / "repository").mkdir()
    env = {**os.environ, "VLMSERVE_CACHE_DIR": str(tmp_path), "VLMSERVE_REPOSITORY": str(tmp_path / "repository")}
    base = [*command, "-f", str(COMPOSE), "-p", COMPOSE_PROJECT]

    def run(*args: str) -> str:
        proc = subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert set(run("config", "--profiles").split()) == set(PROFILES)
    for profile in PROFILES:
        resolved = yaml.safe_load(run("--profile", profile, "config"))
        triton = resolved["services"][f"triton-{profile}"]
        assert triton["build"]["context"] == str(tmp_path / f"context-{profile}")
        (models,) = [v for v in triton["volumes"] if isinstance(v, dict) and v["target"] == "/models"]
        assert models["source"] == str(tmp_path / "repository") and models["read_only"] is True


# ---------------------------------------------------------------------------------------------- Dockerfiles


def instructions(image: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile.<image>, continuations joined, comments dropped."""
    lines = [line for line in (DOCKER / f"Dockerfile.{image}").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def env_of(image: str) -> dict[str, str]:
    """The ENV values the runtime stage sets (last stage, ``KEY=VALUE`` form)."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(image):
        if keyword == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((keyword, args))
    env: dict[str, str] = {}
    for keyword, args in stages[-1]:
        if keyword == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S*)', args):
                env[key] = value.strip('"')
    return env


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_shape(image: str) -> None:
    steps = instructions(image)
    keywords = [k for k, _ in steps]
    assert keywords.count("FROM") >= 2, "two stages: dependencies from the wheelhouse, then the runtime"
    last_from = len(keywords) - 1 - keywords[::-1].index("FROM")
    assert "COPY" in keywords[last_from:] and any(a.startswith("--from=deps") for k, a in steps if k == "COPY")
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime runs as a non-root user"
    healthchecks = [a for k, a in steps if k == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and json.dumps(HEALTH_CMD)[1:-1] in healthchecks[0]
    assert any("/hf-cache" in a for k, a in steps if k == "VOLUME")
    (entrypoint,) = [json.loads(a) for k, a in steps if k == "ENTRYPOINT"]
    assert entrypoint[-3:] == ["python", "-m", "vlmserve.orchestrator.container"]
    assert [json.loads(a) for k, a in steps if k == "CMD"][-1] == ["triton"]
    env = env_of(image)
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"] == "/hf-cache"
    assert env["VLMSERVE_REPOSITORY"] == "/models"
    assert env["VLMSERVE_MODEL_CONFIG_NAME"] == CONFIG_NAME[image]
    assert env["VLMSERVE_ROLE"] == "triton"


def test_rocm_image_places_models_on_the_amd_gpu() -> None:
    env = env_of("rocm")
    assert env[common.ACCELERATOR_ENV] == "rocm"
    useradd = next(a for k, a in instructions("rocm") if k == "RUN" and "useradd" in a)
    assert re.search(r"--groups\s+video,render", useradd)


def test_gpu_image_runs_python_models_with_a_python_311_stub() -> None:
    runs = " ".join(a for k, a in instructions("gpu") if k == "RUN")
    assert "python_backend_stubs/3.11/triton_python_backend_stub" in runs and "ln -s" in runs
    assert env_of("gpu")["PYTHONPATH"] == "/opt/venv/lib/python3.11/site-packages"
