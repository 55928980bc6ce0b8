"""Where vlmserve keeps what it builds and runs (one state directory, ``VLMSERVE_HOME``)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def state_dir() -> Path:
    """The state directory: ``$VLMSERVE_HOME`` or ``<project>/.vlmserve``."""
    return Path(os.environ.get("VLMSERVE_HOME", PROJECT_ROOT / ".vlmserve")).resolve()


def tiny_models_dir() -> Path:
    return state_dir() / "tiny-models"


def repository_dir(model_set: str) -> Path:
    return state_dir() / "repository" / model_set


def cache_dir() -> Path:
    """Build caches kept across checkouts (Docker wheelhouse, base rootfs): ``$VLMSERVE_CACHE_DIR``."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmserve"
    return Path(os.environ.get("VLMSERVE_CACHE_DIR", default)).resolve()
