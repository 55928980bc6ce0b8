"""Readiness-first drain: after SIGTERM the gateway answers /readyz 503 but keeps serving everything else for
``drain_delay_s`` (load balancers and Kubernetes endpoints move away meanwhile), and only then drains and exits,
even when idle (before, an idle gateway exited at once: refused connections while endpoints were being removed).
The 503 + Retry-After of the drain itself: tests/unit/test_backpressure.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import free_port
from vlmserve.gateway.settings import GatewaySettings


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return None


def test_idle_gateway_turns_unready_serves_on_then_drains_and_exits() -> None:
    port = free_port()
    env = {**os.environ, "VLMSERVE_GATEWAY_PORT": str(port), "VLMSERVE_GATEWAY_HOST": "127.0.0.1",
           "VLMSERVE_GATEWAY_TRITON_URL": f"127.0.0.1:{free_port()}",  # no Triton: not needed here
           "VLMSERVE_GATEWAY_DRAIN_DELAY_S": "4", "VLMSERVE_GATEWAY_RETRY_AFTER_S": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmserve.gateway"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _get(f"{base}/readyz") != 200:  # polls a condition (the gateway listening), bounded
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # Phase 1 (drain_delay_s): unready, still serving.
        unready = _get(f"{base}/readyz")
        served = httpx.get(f"{base}/openapi.json", timeout=5)
        live = _get(f"{base}/livez")
        in_phase_1 = time.monotonic() - signalled < 3.5  # the answers above came inside the 4-s delay
        assert proc.poll() is None, "an idle gateway must not exit before its drain delay"
        assert unready == 503 and served.status_code == 200 and live == 200 and in_phase_1
        # Phase 2: nothing in progress, so the drain ends at once and the gateway exits, after the delay only.
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - signalled >= 3.9
        assert _get(f"{base}/livez") is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_drain_delay_defaults_to_zero_outside_deployments() -> None:
    assert GatewaySettings().drain_delay_s == 0.0
