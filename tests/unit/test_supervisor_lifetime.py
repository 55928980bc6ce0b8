"""Children tied to their supervisor (PR_SET_PDEATHSIG) and the start-time check for a stale stack, on real (tiny)
processes: `sleep`-like Pythons stand in for Triton and the gateway."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from vlmserve.orchestrator.launcher import StartupError
from vlmserve.orchestrator.launchers.process import ProcessLauncher
from vlmserve.orchestrator.lifetime import die_with_parent
from vlmserve.orchestrator.ports import stack_ports
from vlmserve.orchestrator.settings import OrchestratorSettings

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def gone_within(proc: psutil.Process, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_a_tied_child_dies_with_its_parent_even_by_sigkill() -> None:
    # The parent starts a tied child, prints its pid, then waits; SIGKILL of the parent must end the child.
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from vlmserve.orchestrator.lifetime import die_with_parent\n"
        f"child = subprocess.Popen({SLEEPER!r}, preexec_fn=die_with_parent())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        parent.kill()
        parent.wait(timeout=30)
        assert gone_within(child), "the tied child outlived its SIGKILLed parent"
    finally:
        parent.kill()


def test_no_tie_from_another_thread() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* ends: a child started from a worker thread would be killed
    # as soon as that thread finished, so it is started untied.
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(die_with_parent()))
    worker.start()
    worker.join()
    assert got == [None] and die_with_parent() is not None


def launcher(tmp_path: Path, **ports: int) -> ProcessLauncher:
    settings = OrchestratorSettings(**(ports or stack_ports()), repository=tmp_path / "repo",
                                    state_dir=tmp_path / "state")
    return ProcessLauncher(settings, log=lambda m: None)


def record(rt: ProcessLauncher, pid: int, supervisor: int, started: float | None = None) -> None:
    rt.run_dir.mkdir(parents=True, exist_ok=True)
    started = psutil.Process(pid).create_time() if started is None else started
    rt.state_file.write_text(json.dumps({"triton": {"pid": pid, "log": str(rt.run_dir / "triton.log"),
                                                    "url": "http://127.0.0.1:1", "restarts": 0,
                                                    "supervisor": supervisor, "started": started}}))


def test_start_stops_a_stack_whose_supervisor_is_gone(tmp_path: Path) -> None:
    rt = launcher(tmp_path)
    # Its recorded supervisor is not its parent: the supervisor that started it died (it was reparented).
    orphan = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        record(rt, orphan.pid, supervisor=orphan.pid + 1)
        # The stale stack is stopped; the start then goes on (and fails for the empty repository, not "already
        # running").
        with pytest.raises(StartupError, match="vlmserve export"):
            rt.start()
        assert orphan.wait(timeout=30) is not None
        assert not rt.state_file.exists()
    finally:
        orphan.kill()


def test_start_refuses_a_stack_whose_supervisor_is_alive(tmp_path: Path) -> None:
    rt = launcher(tmp_path)
    child = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        record(rt, child.pid, supervisor=os.getpid())  # we started it and we are alive: it is supervised
        with pytest.raises(StartupError, match="already running: triton"):
            rt.start()
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_start_refuses_a_busy_port_and_names_who_holds_it(tmp_path: Path) -> None:
    ports = stack_ports()
    rt = launcher(tmp_path, **ports)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports["gateway_port"]))
        holder.listen()
        with pytest.raises(StartupError) as err:
            rt.start()
    message = str(err.value)
    assert f"gateway port 127.0.0.1:{ports['gateway_port']} is in use by pid {os.getpid()}" in message, message
    assert "VLMSERVE_GATEWAY_PORT" in message and "vlmserve down" in message


def test_a_reused_pid_is_neither_stopped_nor_counted_as_running(tmp_path: Path) -> None:
    rt = launcher(tmp_path)
    stranger = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        # The recorded process started at another time: this pid now belongs to someone else.
        record(rt, stranger.pid, supervisor=stranger.pid + 1, started=1.0)
        with pytest.raises(StartupError, match="vlmserve export"):
            rt.start()
        assert stranger.poll() is None, "an unrelated process was killed"
    finally:
        stranger.kill()
        stranger.wait()
