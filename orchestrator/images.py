"""Building the vlmserve images (``docker/Dockerfile.<image>``) offline, from a local wheelhouse.

No registry is reachable from inside a build here (and many production build hosts are air-gapped), so the
host collects every wheel the image needs (``pip download``; pip's own cache makes repeats cheap) into
``<cache>/wheelhouse``, and the build context is assembled from it. The dependency part of the wheelhouse is
reused while the project's dependency list is unchanged; only the project wheel is rebuilt every time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmserve import paths

IMAGES = ("cpu", "gpu", "rocm")
# What the image runs: the Triton Python models (`models`) and the gateway (`gateway`).
# observability: a container with VLMSERVE_OTLP_ENDPOINT set exports spans (the SDK is imported only then).
IMAGE_EXTRAS = ("models", "gateway", "observability")
TRITON_WHEEL = "nvidia-pytriton==0.7.0"  # the tritonserver binary; installed --no-deps (see Makefile)
LABEL = "io.vlmserve.managed"


class ImageBuildError(RuntimeError):
    """The wheelhouse or the image could not be built; the message says which step and why."""


def dockerfile(image: str) -> Path:
    if image not in IMAGES:
        raise ValueError(f"unknown image {image!r}; choose one of {', '.join(IMAGES)}")
    return paths.PROJECT_ROOT / "docker" / f"Dockerfile.{image}"


def image_requirements(pyproject: Path | None = None) -> list[str]:
    """The image's pip requirements: the project's dependencies plus the extras its services need to run
    (IMAGE_EXTRAS; not the project)."""
    data = tomllib.loads((pyproject or paths.PROJECT_ROOT / "pyproject.toml").read_text())
    project = data["project"]
    reqs = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        reqs += [r for r in project["optional-dependencies"][extra] if not r.startswith("vlmserve")]
    return sorted(dict.fromkeys(reqs))


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"{what} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")


def build_wheelhouse(cache: Path, log: Callable[[str], None] = print) -> Path:
    """``<cache>/wheelhouse`` with ``deps/`` (reused while requirements are unchanged) and ``project/``."""
    house = cache / "wheelhouse"
    deps, project = house / "deps", house / "project"
    reqs = image_requirements() + [TRITON_WHEEL]
    digest = hashlib.sha256("\n".join(reqs).encode()).hexdigest()
    marker = deps / ".requirements.sha256"
    if not (marker.exists() and marker.read_text() == digest):
        log(f"collecting {len(reqs)} requirements into {deps} (pip download; first run takes a few minutes)")
        shutil.rmtree(deps, ignore_errors=True)
        deps.mkdir(parents=True)
        req_file = deps / "requirements.txt"
        req_file.write_text("\n".join(image_requirements()) + "\n")
        _pip(["download", "-q", "-d", str(deps), "--only-binary=:all:", "-r", str(req_file)], "pip download")
        _pip(["download", "-q", "-d", str(deps), "--no-deps", TRITON_WHEEL], "pip download (tritonserver)")
        marker.write_text(digest)
    else:
        log(f"wheelhouse up to date ({deps})")
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    # setuptools reuses <project>/build/lib: files deleted from the source would otherwise linger in the wheel.
    shutil.rmtree(paths.PROJECT_ROOT / "build", ignore_errors=True)
    _pip(["wheel", "-q", "--no-deps", "-w", str(project), str(paths.PROJECT_ROOT)], "building the vlmserve wheel")
    return house


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("."):
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def build_context(image: str, house: Path, dest: Path) -> Path:
    """The build context: Dockerfile, requirements.txt, wheels/ and project/ (hard links, no copies)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copy2(dockerfile(image), dest / "Dockerfile")
    shutil.copy2(house / "deps" / "requirements.txt", dest / "requirements.txt")
    _link_tree(house / "deps", dest / "wheels")
    _link_tree(house / "project", dest / "project")
    return dest


def build_image(
    client: Any, image: str, tag: str, cache: Path, base_image: str = "debian:bookworm-slim",
    log: Callable[[str], None] = print,
) -> str:
    """Build ``docker/Dockerfile.<image>`` as ``tag`` through the Docker Engine API; returns the image id."""
    import docker.errors

    if image != "cpu":
        # The gpu/rocm bases come from registries (NGC, Docker Hub); build them where those are reachable.
        log(f"note: Dockerfile.{image} needs its base image from a registry; building with whatever is local")
    house = build_wheelhouse(cache, log)
    context = build_context(image, house, cache / f"context-{image}")
    log(f"building {tag} from {dockerfile(image).relative_to(paths.PROJECT_ROOT)} (context {context})")
    previous = _image_id(client, tag)
    try:
        stream = client.api.build(path=str(context), tag=tag, rm=True, forcerm=True, decode=True,
                                  buildargs={"BASE_IMAGE": base_image} if image == "cpu" else None,
                                  labels={LABEL: "image"})
        image_id = None
        for chunk in stream:
            if "error" in chunk:
                raise ImageBuildError(f"docker build of {tag} failed: {chunk['error'].strip()}")
            line = chunk.get("stream", "").rstrip()
            if line.startswith("Step ") or line.startswith(" ---> Using cache"):
                log(line)
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
    except docker.errors.APIError as exc:
        raise ImageBuildError(f"docker build of {tag} failed: {exc}") from None
    image_id = image_id or client.images.get(tag).id
    if previous and previous != image_id:
        _drop_untagged(client, previous, log)
    return image_id


def _image_id(client: Any, ref: str) -> str | None:
    import docker.errors

    try:
        return str(client.images.get(ref).id)
    except docker.errors.ImageNotFound:
        return None


def _drop_untagged(client: Any, image_id: str, log: Callable[[str], None]) -> None:
    """Remove the image a rebuild replaced, if nothing else names or uses it (repeat builds do not pile up)."""
    import docker.errors

    try:
        if client.images.get(image_id).tags:
            return
        client.images.remove(image_id)
        log(f"removed the replaced image {image_id[:19]}")
    except docker.errors.APIError as exc:  # still used by a container, or gone already
        log(f"kept the replaced image {image_id[:19]}: {exc.explanation or exc}")
