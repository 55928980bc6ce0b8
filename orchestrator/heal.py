"""Healing next to one Triton: a model whose Python stub died is reloaded on that Triton, by its own supervisor.

Each instance of a Python-backend model runs in its own ``triton_python_backend_stub`` process, a child of
tritonserver whose command line names the model file (``<repository>/<model>/<version>/model.py``). When a stub
dies (the OOM killer, a crash in native code, ``kill -9``) Triton keeps the model READY, does not reap the stub,
and fails every request to it (``Stub process '<instance>' is not healthy.``, HTTP 500 / gRPC INTERNAL); only an
unload followed by a load gives the model a new stub. Triton's load alone is a no-op for a loaded model whose
files did not change since it was read (its repository poll classes it "unmodified"), hence unload, then load.

:class:`StubWatcher` runs beside exactly one tritonserver (the process launcher's supervisor, the container
entrypoint ``python -m vlmserve.orchestrator.container triton`` in Docker, Swarm and Kubernetes) and talks only to that
server on localhost: with several replicas each heals its own models and never touches another replica's. The
gateway does not reload anything; it answers 503 + Retry-After for the model meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from vlmserve.orchestrator.lifetime import sleep_unless

STUB = "triton_python_backend_stub"


def stubs_by_model(triton_pid: int) -> dict[str, set[int]]:
    """The live (not zombie) Python stubs under ``triton_pid``, by model name (from the model file's path)."""
    found: dict[str, set[int]] = {}
    for child in psutil.Process(triton_pid).children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = child.cmdline()
        except psutil.Error:  # gone meanwhile, or a zombie
            continue
        if len(cmdline) > 1 and Path(cmdline[0]).name == STUB:
            found.setdefault(Path(cmdline[1]).parent.parent.name, set()).add(child.pid)
    return found


class StubWatcher:
    """Watch one Triton's Python stubs; unload + load (on that Triton) a READY model that lost one.

    ``triton_pid`` returns the pid of the tritonserver to watch, or None while there is none (it is restarting:
    the supervisor's business). A model's stubs are remembered while Triton reports it READY. A remembered stub
    that is now a zombie died on its own: Triton (2.51) reaps the stubs it stops itself (an unload, a load with a
    new config) but never one that crashed, and keeps failing that model. So a zombie means a dead model; a stub
    that is simply gone was replaced by Triton and is forgotten, as are models Triton does not report READY
    (loading, unloaded on purpose): a deliberate unload or reload is never undone. A stub that died before it was
    first seen (a zombie has no command line to name its model) shows as a READY Python-backend model without
    any live stub: dead when it is still so at the next look.
    """

    def __init__(self, url: str, triton_pid: Callable[[], int | None], log: Callable[[str], None] = print, *,
                 poll_s: float = 1.0, timeout_s: float = 600.0, backoff_s: float = 1.0,
                 backoff_max_s: float = 30.0, http: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self.http = http or httpx.Client(base_url=self.url)
        self.triton_pid = triton_pid
        self.log = log
        self.poll_s = poll_s
        self.timeout_s = timeout_s  # one model-control call (a load of a real checkpoint takes minutes)
        self.backoff_s = backoff_s  # between failed unload/load attempts, doubling...
        self.backoff_max_s = backoff_max_s  # ...up to this
        self.reloads: dict[str, int] = {}
        self._seen: dict[str, set[int]] = {}
        self._stubless: set[str] = set()  # READY Python-backend models without a live stub at the last look
        self._python: dict[str, bool] = {}  # model -> served by the Python backend (its config says so)
        self._pid: int | None = None

    def _ready_models(self) -> set[str]:
        index = self.http.post("/v2/repository/index", timeout=10).raise_for_status().json()
        return {m["name"] for m in index if m.get("state") == "READY"}

    def _is_python(self, model: str) -> bool:
        if model not in self._python:
            config = self.http.get(f"/v2/models/{model}/config", timeout=10).raise_for_status().json()
            self._python[model] = config.get("backend") == "python"
        return self._python[model]

    def dead(self) -> list[str]:
        """One look: the READY models that lost a stub since the last look."""
        pid = self.triton_pid()
        if pid != self._pid:  # a new tritonserver (or none): its stubs are all new
            self._seen, self._stubless, self._python, self._pid = {}, set(), {}, pid
        if pid is None:
            return []
        try:
            live = stubs_by_model(pid)
            ready = self._ready_models()
            stubless = {m for m in ready if m not in live and self._is_python(m)}
        except (psutil.Error, httpx.HTTPError, ValueError):
            return []  # Triton exiting, restarting or not answering yet: the supervisor's business
        dead = []
        for model in list(self._seen):
            if model not in ready:
                del self._seen[model]
        for model in sorted(ready):
            if any(_zombie(pid) for pid in self._seen.get(model, ())) or \
                    (model in stubless and model in self._stubless):
                dead.append(model)
                self._seen.pop(model, None)  # seen afresh once it is READY with its new stub(s)
            elif model in live:
                self._seen[model] = live[model]
        self._stubless = stubless - set(dead)
        return dead

    def heal(self, model: str, should_stop: Callable[[], bool]) -> bool:
        """Unload, then load ``model`` on this Triton, each step retried with backoff; False if asked to stop."""
        started = time.monotonic()
        self.log(f"model {model}: its Python stub died; reloading it on this Triton ({self.url}): unload, load")
        for step in ("unload", "load"):
            attempt = 0
            while True:
                try:
                    self.http.post(f"/v2/repository/models/{model}/{step}",
                                   timeout=self.timeout_s).raise_for_status()
                    break
                except httpx.HTTPError as exc:
                    attempt += 1
                    delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
                    self.log(f"model {model}: {step} failed (attempt {attempt}, {type(exc).__name__}: {exc}); "
                             f"retrying in {delay:g}s")
                    if sleep_unless(delay, should_stop):
                        return False
        self.reloads[model] = self.reloads.get(model, 0) + 1
        self.log(f"model {model} reloaded in {time.monotonic() - started:.1f}s")
        return True

    def run(self, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            for model in self.dead():
                if not self.heal(model, should_stop):
                    return
            if sleep_unless(self.poll_s, should_stop):
                return

    def start(self, should_stop: Callable[[], bool]) -> threading.Thread:
        """:meth:`run` in a daemon thread."""
        thread = threading.Thread(target=self.run, args=(should_stop,), name="stub-watcher", daemon=True)
        thread.start()
        return thread


def _zombie(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:  # reaped: stopped by Triton itself
        return False
