"""The inference engines the gateway can stand in front of, by name (setting ``VLMSERVE_GATEWAY_BACKEND``).

An engine is one module with a class that implements :class:`vlmserve.gateway.engines.Engine` and builds itself
from the gateway's settings (``from_settings``); adding one is that module plus one line in :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from vlmserve.gateway.engines import Engine
    from vlmserve.gateway.settings import GatewaySettings

__all__ = ["BACKENDS", "load_backend"]

BACKENDS: dict[str, str] = {
    "triton": "vlmserve.gateway.backends.triton:TritonBackend",
}


def load_backend(settings: GatewaySettings) -> Engine:
    """The engine ``settings.backend`` names, built from the settings; ValueError naming the known ones."""
    target = BACKENDS.get(settings.backend)
    if target is None:
        raise ValueError(f"unknown gateway backend {settings.backend!r}; choose from {', '.join(BACKENDS)}")
    module, _, name = target.partition(":")
    kind = getattr(importlib.import_module(module), name)
    return cast("Engine", kind.from_settings(settings))
