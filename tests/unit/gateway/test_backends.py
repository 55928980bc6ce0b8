"""The engine table: ``VLMSERVE_GATEWAY_BACKEND`` names the engine the gateway builds from its settings."""

from __future__ import annotations

import pytest

from vlmserve.gateway.backends import BACKENDS, load_backend
from vlmserve.gateway.backends.triton import TritonBackend
from vlmserve.gateway.engines import Engine
from vlmserve.gateway.settings import GatewaySettings


def test_the_default_engine_is_triton_built_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLMSERVE_GATEWAY_BACKEND", raising=False)
    engine = load_backend(GatewaySettings(triton_url="triton:8000", retry_after_s=7))
    assert isinstance(engine, TritonBackend) and isinstance(engine, Engine)
    assert (engine.url, engine.grpc_url, engine.retry_after_s) == ("triton:8000", "127.0.0.1:8001", 7)
    assert set(BACKENDS) == {"triton"}


def test_an_unknown_engine_is_refused_naming_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMSERVE_GATEWAY_BACKEND", "vllm")
    with pytest.raises(ValueError, match="unknown gateway backend 'vllm'; choose from triton"):
        load_backend(GatewaySettings())
