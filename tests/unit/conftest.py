"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import free_port
from vlmserve.gateway.app import create_app
from vlmserve.gateway.settings import GatewaySettings


@pytest.fixture
def offline_gateway():
    """A gateway app with its default settings and no Triton behind it (nothing listens on its port)."""
    settings = GatewaySettings(triton_url=f"127.0.0.1:{free_port()}")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c
