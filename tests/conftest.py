"""Shared fixtures: the tiny model repository, built once per test session into a temporary state dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.ports import free_port

__all__ = ["free_port"]


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
