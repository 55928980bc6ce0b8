"""The web UI in a real headless browser (Debian's chromium through Playwright) against the real stack.

The stack is the session's shared fixture from tests/conftest.py (tritonserver + gateway on the tiny random
models), the same one the integration tests use. One browser per session; each test gets a fresh context whose
every request is checked: anything not addressed to the gateway (or a data:/blob: URL the page made itself) is
aborted and fails the test.

Without chromium the tests are skipped on a developer machine (`bash tests/browser/install-chromium.sh` installs
it); under CI (`CI=true`) a missing browser is an error, because .ci/run installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Stack


def chromium_path() -> str | None:
    return os.environ.get("VLMSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


# Package scope, not session: Playwright's sync API runs an asyncio loop in this thread while it is open, and every
# later test that calls asyncio.run() would fail ("cannot be called from a running event loop").
@pytest.fixture(scope="package")
def browser():
    executable = chromium_path()
    if executable is None:
        message = "no chromium here; `bash tests/browser/install-chromium.sh` installs Debian's"
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide chromium: {message}")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    """Screenshots of every panel land here (the session's pytest temp folder), e.g. for docs/images."""
    path = Path(os.environ.get("VLMSERVE_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Traffic:
    """Every request the page made, and those that went anywhere but the gateway (aborted)."""

    urls: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def open_ui(browser, base: str, traffic: Traffic, *, width: int = 1280, height: int = 900, hash_: str = ""):
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)

    def route(r) -> None:
        url = r.request.url
        traffic.urls.append(url)
        if url.startswith((base + "/", "data:", "blob:")):
            r.continue_()
        else:
            traffic.foreign.append(url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{base}/{hash_}")  # "/" with the browser's Accept: text/html -> /ui
    return context, page, errors


@pytest.fixture
def ui(browser, stack: Stack) -> Iterator:
    traffic = Traffic()
    context, page, errors = open_ui(browser, stack.gateway, traffic)
    page.traffic = traffic
    yield page
    context.close()
    assert not traffic.foreign, f"the page tried to reach other hosts: {traffic.foreign}"
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="session")
def sample_png() -> Path:
    from vlmserve.paths import PROJECT_ROOT

    return PROJECT_ROOT / "docs" / "images" / "sample.png"


@pytest.fixture(scope="session")
def sample_mp4() -> Path:
    from vlmserve.paths import PROJECT_ROOT

    return PROJECT_ROOT / "docs" / "videos" / "sample.mp4"


