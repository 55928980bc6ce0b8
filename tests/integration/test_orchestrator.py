"""Process launcher lifecycle: foreground run stopped by Ctrl-C leaves nothing behind; startup failures are clear."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from vlmserve.orchestrator.launcher import StartupError
from vlmserve.orchestrator.launchers.process import ProcessLauncher
from vlmserve.orchestrator.ports import stack_port_env, stack_ports
from vlmserve.orchestrator.settings import OrchestratorSettings

pytestmark = pytest.mark.integration


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_foreground_run_stops_everything_on_ctrl_c(tiny_repo: Path, tmp_path: Path) -> None:
    ports = stack_ports()
    env = dict(os.environ, VLMSERVE_STATE_DIR=str(tmp_path), VLMSERVE_REPOSITORY=str(tiny_repo),
               **stack_port_env(ports))
    proc = subprocess.Popen([sys.executable, "-m", "vlmserve.orchestrator", "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{ports['gateway_port']}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("stack did not become healthy")
        services = json.loads((tmp_path / "run" / "services.json").read_text())
        pgids = {name: os.getpgid(s["pid"]) for name, s in services.items()}
        assert set(pgids) == {"triton", "gateway"}
        # `python -m vlmserve.orchestrator status` from another process sees both.
        status = subprocess.run([sys.executable, "-m", "vlmserve.orchestrator", "status"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0 and status.stdout.count("healthy") == 2, status.stdout + status.stderr
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopped" in out
    for name, pgid in pgids.items():
        assert not group_alive(pgid), f"{name} (process group {pgid}) still running after Ctrl-C"
    assert not (tmp_path / "run" / "services.json").exists()


def test_startup_failure_reports_triton_log_tail(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 0\n')
    (repo / "broken" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('boom-from-initialize')\n"
    )
    settings = OrchestratorSettings(
        **stack_ports(),
        repository=repo, state_dir=tmp_path / "state", ready_timeout_s=120,
    )
    launcher = ProcessLauncher(settings, log=lambda m: None)
    with pytest.raises(StartupError, match="(?s)triton exited during startup.*boom-from-initialize"):
        launcher.start()
    assert launcher.running() == {}


def test_empty_repository_is_refused_before_starting(tmp_path: Path) -> None:
    settings = OrchestratorSettings(repository=tmp_path / "nothing", state_dir=tmp_path / "state")
    with pytest.raises(StartupError, match="vlmserve export"):
        ProcessLauncher(settings, log=lambda m: None).start()


def test_up_supervises_restarts_and_down_stops(tiny_repo: Path, tmp_path: Path) -> None:
    """`up` detaches a supervisor; a SIGKILLed Triton is restarted (logged, counted); `down` stops it all."""
    ports = stack_ports()
    env = dict(os.environ, VLMSERVE_STATE_DIR=str(tmp_path), VLMSERVE_REPOSITORY=str(tiny_repo),
               VLMSERVE_RESTART_BACKOFF_S="0.5", **stack_port_env(ports))
    cli = [sys.executable, "-m", "vlmserve.orchestrator"]
    run_dir = tmp_path / "run"
    try:
        up = subprocess.run([*cli, "up", "--accelerator", "cpu"], env=env, capture_output=True, text=True,
                            timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "vlmserve is up (process, supervised" in up.stderr
        supervisor = json.loads((run_dir / "supervisor.json").read_text())["pid"]
        first = json.loads((run_dir / "services.json").read_text())
        os.killpg(os.getpgid(first["triton"]["pid"]), signal.SIGKILL)

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            now = json.loads((run_dir / "services.json").read_text())
            if now["triton"]["pid"] != first["triton"]["pid"] and now["triton"]["restarts"] == 1:
                try:
                    if httpx.get(f"http://127.0.0.1:{ports['http_port']}/v2/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        else:
            pytest.fail("triton was not restarted:\n" + (run_dir / "supervisor.log").read_text()[-3000:])
        log = (run_dir / "supervisor.log").read_text()
        assert "triton exited unexpectedly (killed by SIGKILL); restart 1" in log, log[-3000:]
        assert now["gateway"]["pid"] == first["gateway"]["pid"]  # the gateway was left alone

        status = subprocess.run([*cli, "status", "--launcher", "process", "--json"], env=env, capture_output=True,
                                text=True, timeout=60)
        rows = {r["service"]: r for r in json.loads(status.stdout)["services"]}
        assert rows["triton"]["restarts"] == 1 and rows["triton"]["health"] == "healthy", rows
        assert rows["gateway"]["restarts"] == 0 and "RSS" in rows["gateway"]["memory"], rows

        ensure = subprocess.run([*cli, "ensure"], env=env, capture_output=True, text=True, timeout=120)
        assert "already running and healthy" in ensure.stderr, ensure.stderr

        down = subprocess.run([*cli, "down", "--launcher", "process"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0 and "process supervisor" in down.stderr, down.stderr
    finally:
        subprocess.run([*cli, "down", "--launcher", "process"], env=env, capture_output=True, timeout=120)
    assert not group_alive(supervisor)
    for service in now.values():
        assert not group_alive(service["pid"]), "a service outlived `down`"
    assert not (run_dir / "services.json").exists()
