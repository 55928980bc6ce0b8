"""The web UI's routes without a browser or models: redirect, static files, headers, keys, Triton down."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from tests.conftest import free_port
from vlmserve.gateway.app import create_app
from vlmserve.gateway.settings import GatewaySettings
from vlmserve.gateway.ui import STATIC


@pytest.fixture
def client(offline_gateway):
    return offline_gateway


def test_root_redirects_browsers_and_keeps_the_json_404_for_api_clients(client) -> None:
    browser = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},
                         follow_redirects=False)
    assert browser.status_code == 307 and browser.headers["location"] == "/ui"
    unknown = client.get("/no-such-route")
    for accept in ("application/json", "*/*", None):
        api = client.get("/", headers={"Accept": accept} if accept else {})
        # What "/" answered before the UI; each answer carries its own request's id.
        assert api.json()["error"].pop("request_id") == api.headers["X-Request-ID"]
        assert api.status_code == 404 and api.json()["error"] | {"request_id": None} == \
            unknown.json()["error"] | {"request_id": None}


def test_ui_files_are_served_with_a_same_origin_content_security_policy(client) -> None:
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    script = client.get("/ui/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/app.css").headers["content-type"].startswith("text/css")
    for path in ("/ui/missing.js", "/ui/..%2Fapp.py", "/ui/__init__.py"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path


def test_every_file_the_page_loads_ships_in_the_package_and_nothing_points_elsewhere() -> None:
    names = {p.name for p in STATIC.iterdir()}
    html = (STATIC / "index.html").read_text()
    referenced = set(re.findall(r'(?:src|href)="/ui/([^"]+)"', html))
    for js in STATIC.glob("*.js"):
        referenced |= set(re.findall(r'from "\./([^"]+)"', js.read_text()))
    assert referenced and referenced <= names, referenced - names
    for path in STATIC.iterdir():
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a request
        assert not re.search(r"https?://", text), f"{path.name} refers to another host"  # no CDN, no web fonts


def test_ui_is_public_but_its_api_needs_the_key() -> None:
    settings = GatewaySettings(triton_url=f"127.0.0.1:{free_port()}", api_keys=["k1"])
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert c.get("/ui").status_code == 200 and c.get("/ui/common.js").status_code == 200
        assert c.get("/ui/api/triton-stats").status_code == 401
        down = c.get("/ui/api/triton-stats", headers={"Authorization": "Bearer k1"})
        assert down.status_code == 503 and down.headers["retry-after"] == "5"
        assert down.json()["error"]["code"] == "triton_unavailable"


def test_triton_stats_are_trimmed_per_model() -> None:
    from tests.fakes import FakeEngine
    from vlmserve.gateway.engines import ModelInfo

    backend = FakeEngine([ModelInfo.of("b", True, {}), ModelInfo.of("a", True, {})])
    with TestClient(create_app(GatewaySettings(), backend=backend), raise_server_exceptions=False) as c:
        stats = c.get("/ui/api/triton-stats").json()
    assert stats["triton"] == FakeEngine.url
    assert [m["name"] for m in stats["models"]] == ["a", "b"]
    assert stats["models"][0]["success"] == {"count": 0, "ns": 0}
