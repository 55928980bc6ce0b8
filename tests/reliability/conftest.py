"""The reliability suite's own stack (tiny models, process launcher) with small in-flight caps, and its report.

``make test`` runs the smoke parts. ``make chaos`` (VLMSERVE_CHAOS=1) adds the long ones (kill -9 of Triton under
load, the soak at saturation, schemathesis with more examples) and writes ``loadtests/reports/chaos.{json,md}``
(VLMSERVE_CHAOS_REPORT=<path without suffix>) with the figures the tests record.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vlmserve.host import cpu_info
from vlmserve.orchestrator.launchers.process import ProcessLauncher
from vlmserve.orchestrator.ports import stack_ports
from vlmserve.orchestrator.settings import OrchestratorSettings

CHAOS = os.environ.get("VLMSERVE_CHAOS") == "1"
FIGURES: dict[str, Any] = {}
CHAT_CAP = 2  # VLMSERVE_GATEWAY_MAX_INFLIGHT_CHAT of this stack
SUPERVISOR_LOG: list[str] = []  # what the stack's supervisor logged (restarts, stub reloads)


def pytest_sessionfinish(session, exitstatus) -> None:
    target = os.environ.get("VLMSERVE_CHAOS_REPORT")
    if not target or not FIGURES:
        return
    base = Path(target)
    base.parent.mkdir(parents=True, exist_ok=True)
    meta = {"host": platform.node(), "cpu": cpu_info().summary, "cpus": os.cpu_count(), "chaos": CHAOS,
            "exit_status": int(exitstatus), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "figures": FIGURES}, indent=2, default=str))
    lines = ["# vlmserve chaos report", "", f"Host `{meta['host']}`: {meta['cpu']}, tiny models, "
             f"process launcher, finished {meta['finished_utc']}, pytest exit status {meta['exit_status']}.", ""]
    for name, values in FIGURES.items():
        lines += [f"## {name}", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in values.items()]
        lines.append("")
    base.with_suffix(".md").write_text("\n".join(lines))


@pytest.fixture(scope="session")
def rstack(tiny_repo: Path, state_dir: Path):
    settings = OrchestratorSettings(
        **stack_ports(),
        repository=tiny_repo, state_dir=state_dir / "reliability", ready_timeout_s=240,
    )
    launcher = ProcessLauncher(settings, log=SUPERVISOR_LOG.append)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMSERVE_GATEWAY_URL_ALLOWLIST", '["127.0.0.1"]')
        mp.setenv("VLMSERVE_GATEWAY_MAX_INFLIGHT_CHAT", str(CHAT_CAP))
        mp.setenv("VLMSERVE_GATEWAY_RETRY_AFTER_S", "2")
        mp.setenv("VLMSERVE_GATEWAY_REGISTRY_TTL_S", "1")
        launcher.start()
    # Supervised as `vlmserve run` / `up` supervise: crashed services restart, dead Python stubs are reloaded.
    stop = threading.Event()
    supervisor = threading.Thread(target=launcher.supervise, args=(stop.is_set,), daemon=True)
    supervisor.start()

    def halt_supervision() -> None:
        """Before stopping the stack on purpose: else the supervisor restarts what the stop ends, from its own
        thread (children of a thread other than the main one are not tied to this process: they would outlive
        the test run)."""
        stop.set()
        supervisor.join(300)
        assert not supervisor.is_alive(), "the supervisor did not stop"

    launcher.halt_supervision = halt_supervision  # type: ignore[attr-defined]
    yield launcher
    halt_supervision()
    launcher.stop()
