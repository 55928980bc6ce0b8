"""Nothing outlives its supervisor: SIGKILL of `vlmserve run`, SIGTERM of the bench mid-run: within 10 s no
tritonserver, Python stub, gateway, baseline server or Locust that they started is left.

The processes are the supervisor's own descendants, listed (psutil, which tells a reused pid apart) before the
signal, so other tests' stacks running meanwhile are never counted."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from vlmserve.orchestrator.ports import stack_port_env, stack_ports

pytestmark = pytest.mark.integration

GONE_WITHIN_S = 10.0


def tiny_home(tmp_path: Path, tiny_repo: Path, state_dir: Path) -> Path:
    """A VLMSERVE_HOME with the session's tiny checkpoints and repository (copied: nothing is re-exported)."""
    home = tmp_path / "home"
    shutil.copytree(state_dir / "tiny-models", home / "tiny-models")
    shutil.copytree(tiny_repo, home / "repository" / "tiny")
    return home


def descendants_when(proc: subprocess.Popen, log: Path, ready, timeout: float, what: str) -> list[psutil.Process]:
    """Poll until ``ready(descendants)`` holds; returns the descendants then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        found = psutil.Process(proc.pid).children(recursive=True)
        if ready(found):
            return found
        time.sleep(1)
    pytest.fail(f"{what} not reached within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def left(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {cmdline(p)[:120]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def assert_all_gone(processes: list[psutil.Process]) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while left(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left(processes), f"still running {GONE_WITHIN_S:.0f}s after the supervisor ended: {left(processes)}"


def kill_all(processes: list[psutil.Process]) -> None:
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # ended meanwhile (a zombie has none)
        return ""


def names(processes: list[psutil.Process]) -> str:
    return "\n".join(cmdline(p) for p in processes)


def is_triton(p: psutil.Process) -> bool:
    return "tritonserver --model-repository" in cmdline(p)


def is_stub(p: psutil.Process) -> bool:
    return "triton_python_backend_stub" in cmdline(p)


def is_gateway(p: psutil.Process) -> bool:
    return cmdline(p).endswith(" -m vlmserve.gateway")


def test_sigkill_of_run_takes_triton_stubs_and_gateway_with_it(tiny_repo: Path, tmp_path: Path) -> None:
    """`vlmserve run` is what `make demo` runs after its export."""
    ports = stack_ports()
    env = dict(os.environ, VLMSERVE_STATE_DIR=str(tmp_path), VLMSERVE_REPOSITORY=str(tiny_repo),
               **stack_port_env(ports))
    log = tmp_path / "run.out"
    with open(log, "w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "vlmserve.orchestrator", "run"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    started: list[psutil.Process] = []
    try:
        def serving(found: list[psutil.Process]) -> bool:
            try:
                ok = httpx.get(f"http://127.0.0.1:{ports['gateway_port']}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
            return ok and any(is_stub(p) for p in found)

        started = descendants_when(demo, log, serving, 400, "a healthy stack")
        assert any(is_triton(p) for p in started) and any(is_gateway(p) for p in started), names(started)
        demo.kill()
        demo.wait(timeout=30)
        assert_all_gone(started)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{ports['gateway_port']}/livez", timeout=2)
    finally:
        if demo.poll() is None:
            demo.kill()
        kill_all(started)


BENCH = """
import sys
from pathlib import Path
from vlmserve.loadtests.bench import run_bench
run_bench("sigterm", siglip=False, florence=False, chat_users=(1,), chat_duration_s=600, chat_max_tokens=2,
          chat_structured_share=0, repeats=1, model_set="tiny", out_dir=Path(sys.argv[1]), log=print)
"""


def test_sigterm_of_bench_mid_run_takes_everything_it_started(tiny_repo: Path, state_dir: Path,
                                                              tmp_path: Path) -> None:
    if importlib.util.find_spec("locust") is None:  # not imported: locust's import patches this process (gevent)
        pytest.skip("locust is not installed: pip install -e '.[loadtest]'")
    home = tiny_home(tmp_path, tiny_repo, state_dir)
    env = dict(os.environ, VLMSERVE_HOME=str(home))
    log = tmp_path / "bench.out"
    with open(log, "w") as out:
        bench = subprocess.Popen([sys.executable, "-c", BENCH, str(tmp_path / "reports")], env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    started: list[psutil.Process] = []
    try:
        # Mid-run: baseline server and stack up, Locust running its first chat scenario.
        started = descendants_when(
            bench, log, lambda found: any("-m locust" in cmdline(p) for p in found), 600, "the first scenario")
        cmdlines = [cmdline(p) for p in started]
        assert any(is_triton(p) for p in started) and any(is_stub(p) for p in started), cmdlines
        assert any(is_gateway(p) for p in started), cmdlines
        assert any("vlmserve.loadtests.baseline.server" in c for c in cmdlines), cmdlines
        bench.send_signal(signal.SIGTERM)
        assert_all_gone([*started, psutil.Process(bench.pid)])
        assert bench.wait(timeout=30) == 143
    finally:
        if bench.poll() is None:
            bench.kill()
        kill_all(started)
