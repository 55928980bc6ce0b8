"""The stub watcher (orchestrator/heal.py) on a real process tree shaped like Triton's: a parent that reaps the
children that exit (as tritonserver reaps the stubs it stops) but never one killed by a signal (tritonserver
leaves a crashed stub a zombie), and ``triton_python_backend_stub`` children whose command line names their model
file. Triton's model-control API is a fake (httpx.MockTransport); the reliability suite runs the watcher against a
real Triton, the Swarm e2e inside the containers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from vlmserve.orchestrator.heal import StubWatcher, stubs_by_model


@pytest.fixture
def triton_like(tmp_path: Path):
    """A parent process with two stubs of ``a`` and one of ``b``; it never waits for them."""
    for model in ("a", "b"):
        (tmp_path / model / "1").mkdir(parents=True)
        (tmp_path / model / "1" / "model.py").write_text(  # SIGTERM: a clean exit, as when Triton stops a stub
            "import os, signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
            f"open(os.path.join({str(tmp_path)!r}, f'{{os.getpid()}}.ready'), 'w').close()\ntime.sleep(600)\n")
    parent = textwrap.dedent(f"""
        import os, sys, time
        for model in ("a", "a", "b"):
            path = os.path.join({str(tmp_path)!r}, model, "1", "model.py")
            if os.fork() == 0:
                os.execv(sys.executable, ["/opt/bin/triton_python_backend_stub", path, "shm", "1048576"])
        while True:
            time.sleep(0.05)
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue
            if info is not None and info.si_code == os.CLD_EXITED:
                os.waitpid(info.si_pid, 0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("*.ready"))) < 3:  # polls the children starting, bounded
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield proc
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


class FakeTriton:
    def __init__(self) -> None:
        self.state = {"a": "READY", "b": "READY"}
        self.calls: list[str] = []
        self.fail = {"unload": 0, "load": 0}  # this many calls of each step fail (503) first

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/repository/index":
            return httpx.Response(200, json=[{"name": n, "state": s} for n, s in self.state.items()])
        if request.method == "GET" and request.url.path.endswith("/config"):
            return httpx.Response(200, json={"backend": "python"})
        *_, model, step = request.url.path.split("/")
        self.calls.append(f"{step} {model}")
        if self.fail[step]:
            self.fail[step] -= 1
            return httpx.Response(503, json={"error": "busy"})
        self.state[model] = "READY" if step == "load" else "UNAVAILABLE"
        return httpx.Response(200, content=json.dumps({}))


def _watcher(pid: int, triton: FakeTriton, log: list[str]) -> StubWatcher:
    return StubWatcher("http://127.0.0.1:1", lambda: pid, log.append, backoff_s=0.01, backoff_max_s=0.02,
                       http=httpx.Client(base_url="http://127.0.0.1:1", transport=httpx.MockTransport(triton.handler)))


def _kill(pid: int) -> None:
    victim = psutil.Process(pid)
    victim.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim.status() != psutil.STATUS_ZOMBIE:  # the parent never reaps it, as Triton does not
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_stubs_are_found_by_their_model_file(triton_like) -> None:
    found = stubs_by_model(triton_like.pid)
    assert {m: len(p) for m, p in found.items()} == {"a": 2, "b": 1}


def test_a_killed_stub_gets_its_model_unloaded_then_loaded_on_this_triton_only(triton_like) -> None:
    triton, log = FakeTriton(), []
    watcher = _watcher(triton_like.pid, triton, log)
    assert watcher.dead() == []  # first look: remembers the stubs
    _kill(next(iter(stubs_by_model(triton_like.pid)["a"])))  # one of a's two instances: a zombie now
    assert watcher.dead() == ["a"]
    triton.fail = {"unload": 1, "load": 2}  # Triton busy: each step is retried with backoff
    assert watcher.heal("a", lambda: False)
    assert triton.calls == ["unload a", "unload a", "load a", "load a", "load a"]
    assert watcher.reloads == {"a": 1} and log[-1].startswith("model a reloaded")
    # The model's old live stub is forgotten, not taken for another death; b was never touched.
    assert watcher.dead() == [] and watcher.dead() == []
    assert len(triton.calls) == 5


def test_a_stub_dead_before_the_first_look_is_found_by_its_model_having_none(triton_like) -> None:
    """A zombie has no command line: a READY Python model without any live stub, at two looks in a row, is dead."""
    triton, log = FakeTriton(), []
    _kill(next(iter(stubs_by_model(triton_like.pid)["b"])))
    watcher = _watcher(triton_like.pid, triton, log)
    assert watcher.dead() == []  # once could be a load's fork/exec instant
    assert watcher.dead() == ["b"]
    assert watcher.heal("b", lambda: False) and triton.calls == ["unload b", "load b"]


def test_a_model_unloaded_on_purpose_or_a_new_tritonserver_is_not_reloaded(triton_like) -> None:
    triton, log = FakeTriton(), []
    pid: list[int | None] = [triton_like.pid]
    watcher = _watcher(triton_like.pid, triton, log)
    watcher.triton_pid = lambda: pid[0]
    watcher.dead()
    # Triton replaced one of a's stubs itself (a load with a new config): stopped and reaped, never a zombie.
    replaced = psutil.Process(next(iter(stubs_by_model(triton_like.pid)["a"])))
    replaced.terminate()
    deadline = time.monotonic() + 30
    while replaced.is_running():  # polls the parent reaping it, bounded
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert watcher.dead() == []
    triton.state["b"] = "UNAVAILABLE"  # someone unloaded b: its stub exits
    _kill(next(iter(stubs_by_model(triton_like.pid)["b"])))
    assert watcher.dead() == []
    pid[0] = None  # tritonserver restarting (the supervisor's business)
    assert watcher.dead() == []
    assert triton.calls == []


def test_stopping_ends_a_heal_that_keeps_failing(triton_like) -> None:
    triton, log = FakeTriton(), []
    triton.fail = {"unload": 10**6, "load": 0}
    watcher = _watcher(triton_like.pid, triton, log)
    calls = iter(range(5))
    assert watcher.heal("a", lambda: next(calls, None) is None) is False
    assert watcher.reloads == {}


def _supervise(cmd: list[str]) -> subprocess.Popen:
    code = ("import os, sys; from vlmserve.orchestrator.container import supervise_triton; "
            f"sys.exit(supervise_triton({cmd!r}, dict(os.environ), 'http://127.0.0.1:1'))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2])


def test_the_container_entrypoint_supervises_tritonserver_and_exits_with_its_status() -> None:
    """``container.py triton`` runs tritonserver as a child (the watcher beside it): its exit status is the
    container's (Docker's restart policy), and SIGTERM from ``docker stop`` reaches it."""
    assert _supervise(["sh", "-c", "exit 3"]).wait(60) == 3
    proc = _supervise(["sleep", "600"])
    deadline = time.monotonic() + 60
    while not psutil.Process(proc.pid).children():  # polls the child starting, bounded
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = psutil.Process(proc.pid).children()[0]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert not child.is_running()
