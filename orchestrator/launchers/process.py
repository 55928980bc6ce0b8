"""The ``process`` launcher: tritonserver and the gateway as local child processes.

Each service runs in its own session (process group), so stopping it also stops what it started
(Triton's Python stubs), and dies with the process that started it (:mod:`vlmserve.orchestrator.lifetime`): a supervisor
that is killed takes its stack with it. A ``services.json`` in the run directory records what is running (and
which process supervises it) so that ``python -m vlmserve.orchestrator down|status`` work from another terminal, and so
that a start finds a stale stack: one whose supervisor is gone is stopped; a port held by anything else is refused.

Supervision: :meth:`ProcessLauncher.supervise` (the foreground ``run``, and the detached supervisor that ``up``
starts) restarts a crashed Triton or gateway with exponential backoff and logs every restart; it gives up
after ``max_restarts`` consecutive failures (a service that stayed up for ``STABLE_S`` resets the count).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from vlmserve.orchestrator import triton
from vlmserve.orchestrator.launch import Launch
from vlmserve.orchestrator.launcher import SERVICES, StartupError, healthy, human, observability_env
from vlmserve.orchestrator.lifetime import die_with_parent, sleep_unless
from vlmserve.orchestrator.settings import OrchestratorSettings


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Service:
    name: str
    pid: int
    log: Path
    url: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie child counts as dead.
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return True


def _stop_group(service: Service, timeout: float) -> None:
    """SIGTERM the service's process group, then SIGKILL whatever is left after ``timeout``."""
    try:
        pgid = os.getpgid(service.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                _reap(service.pid)
                return
            _reap(service.pid)
            time.sleep(0.1)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


STABLE_S = 60.0  # a service up this long counts as recovered: its backoff and failure count reset


class ProcessLauncher:
    """Implements :class:`~vlmserve.orchestrator.launcher.Launcher`."""

    name = "process"
    in_image = False  # the wheel's tritonserver: the settings' config flavour (embedded)

    def __init__(self, settings: OrchestratorSettings, log: Callable[[str], None] = print,
                 launch: Launch | None = None) -> None:
        self.settings = settings
        self.log = log
        self.launch = launch
        self.run_dir = settings.run_path
        self.services: dict[str, Service] = {}
        self.restarts: dict[str, int] = {}

    # -- state file ------------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.run_dir / "services.json"

    @property
    def supervisor_file(self) -> Path:
        return self.run_dir / "supervisor.json"

    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = {n: {"pid": s.pid, "log": str(s.log), "url": s.url, "restarts": self.restarts.get(n, 0),
                    "supervisor": os.getpid(), "started": _create_time(s.pid)}
                for n, s in self.services.items()}
        self.state_file.write_text(json.dumps(data, indent=2))

    def _load_raw(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return {}

    def load(self) -> dict[str, Service]:
        """The recorded services that are still the processes recorded (not a reused pid)."""
        return {n: Service(n, d["pid"], Path(d["log"]), d["url"]) for n, d in self._load_raw().items()
                if d.get("started") is None or _create_time(d["pid"]) in (None, d["started"])}

    def supervisor(self) -> Service | None:
        """The detached supervisor started by ``up``, if it is alive."""
        try:
            d = json.loads(self.supervisor_file.read_text())
        except (OSError, ValueError):
            return None
        service = Service("supervisor", d["pid"], Path(d["log"]), "")
        return service if service.alive() else None

    # -- start -----------------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], url: str, append: bool = False) -> Service:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / f"{name}.log"
        with open(log, "ab" if append else "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=die_with_parent(),
            )
        service = Service(name, proc.pid, log, url)
        self.services[name] = service
        self._save()
        return service

    def _wait_ready(self, service: Service, health_url: str) -> None:
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while time.monotonic() < deadline:
            if not service.alive():
                raise StartupError(f"{service.name} exited during startup. Last lines of {service.log}:\n"
                                   f"{tail(service.log)}")
            if healthy(health_url):
                return
            time.sleep(0.5)
        raise StartupError(
            f"{service.name} not ready after {self.settings.ready_timeout_s:.0f}s ({health_url}). "
            f"Last lines of {service.log}:\n{tail(service.log)}"
        )

    def running(self) -> dict[str, Service]:
        return {n: s for n, s in self.load().items() if s.alive()}

    def health_url(self, name: str) -> str:
        s = self.settings
        return f"{s.triton_http_url}/v2/health/ready" if name == "triton" else f"{s.gateway_url}/livez"

    def _start_service(self, name: str, append: bool = False) -> Service:
        s = self.settings
        if name == "triton":
            dist = triton.find_tritonserver()
            backends = triton.prepare_backends(dist, self.run_dir)
            settings = s
            extra: list[str] = []
            env = triton.triton_env(dist)
            env.update(observability_env(s))  # the Python models export spans too
            if self.launch is not None:
                settings = s.model_copy(update={"model_config_name": self.launch.model_config_name(
                    s.model_config_name)})
                extra = self.launch.triton_args()
                env.update(self.launch.env())
            self.log(f"starting tritonserver on {s.host} (http {s.http_port}, grpc {s.grpc_port}, "
                     f"metrics {s.metrics_port}); log: {self.run_dir / 'triton.log'}")
            service = self._spawn("triton", triton.triton_command(settings, dist, backends, extra), env,
                                  s.triton_http_url, append)
        else:
            self.log(f"starting gateway on {s.gateway_url}")
            env = dict(os.environ)
            env.update({
                "VLMSERVE_GATEWAY_HOST": s.gateway_host,
                "VLMSERVE_GATEWAY_PORT": str(s.gateway_port),
                "VLMSERVE_GATEWAY_TRITON_URL": f"{s.host}:{s.http_port}",
                "VLMSERVE_GATEWAY_TRITON_GRPC_URL": f"{s.host}:{s.grpc_port}",
                **observability_env(s),
            })
            service = self._spawn("gateway", [sys.executable, "-m", "vlmserve.gateway"], env, s.gateway_url, append)
        self._wait_ready(service, self.health_url(name))
        return service

    def orphans(self) -> dict[str, Service]:
        """Services of this run directory that are alive but whose supervisor is gone (a stale stack)."""
        raw = self._load_raw()
        found = {}
        for name, service in self.load().items():
            try:
                parent = psutil.Process(service.pid).ppid()
            except psutil.Error:
                continue
            # Recorded by an older vlmserve (no supervisor): orphaned only once reparented to init.
            supervisor = raw[name].get("supervisor", parent if parent != 1 else None)
            if service.alive() and parent != supervisor:
                found[name] = service
        return found

    def clear_stale(self) -> None:
        """Before a start: stop a stale stack of this run directory (its supervisor died); refuse (StartupError)
        when a port is taken by anything else, naming the process that holds it."""
        orphans = self.orphans()
        if orphans:
            self.log("stopping a stale stack whose supervisor is gone: "
                     + ", ".join(f"{n} (pid {s.pid})" for n, s in orphans.items()))
            self.stop(timeout_s=5.0)
        s = self.settings
        busy = [f"{name} port {host}:{port} is in use{_holder(port)}"
                for name, host, port in (("triton http", s.host, s.http_port), ("triton grpc", s.host, s.grpc_port),
                                         ("triton metrics", s.host, s.metrics_port),
                                         ("gateway", s.gateway_host, s.gateway_port))
                if _port_busy(host, port)]
        if busy:
            raise StartupError("; ".join(busy) + ". Stop it (a vlmserve stack of another state directory: "
                               "`VLMSERVE_STATE_DIR=... vlmserve down`; anything else: `kill PID`) or choose other "
                               "ports (VLMSERVE_HTTP_PORT, VLMSERVE_GRPC_PORT, VLMSERVE_METRICS_PORT, "
                               "VLMSERVE_GATEWAY_PORT)")

    def start(self) -> dict[str, Service]:
        """Start Triton, wait until it is ready, then the gateway; raises StartupError (after cleanup)."""
        already = {n: s for n, s in self.running().items() if n not in self.orphans()}
        if already:
            raise StartupError(
                f"already running: {', '.join(already)} (see `vlmserve status`; stop it with `vlmserve down`)"
            )
        self.clear_stale()
        s = self.settings
        if not (s.repository_path.exists() and any(s.repository_path.glob("*/config.pbtxt"))):
            raise StartupError(f"model repository {s.repository_path} is empty: run `vlmserve export` first")
        triton.find_tritonserver()  # fail with the install hint before anything starts
        try:
            for name in SERVICES:
                self._start_service(name)
        except BaseException:
            self.stop()
            raise
        self.log(f"vlmserve is up: gateway {s.gateway_url}, triton {s.triton_http_url}")
        return self.services

    # -- stop / status ---------------------------------------------------------------------------------

    def stop(self, timeout_s: float | None = None) -> list[str]:
        """Stop the gateway, then Triton (each SIGTERM, then SIGKILL after ``timeout_s``, by default the
        settings' ``stop_timeout_s``); returns the names that were stopped."""
        services = {**self.load(), **self.services}
        stopped = []
        for name in reversed(SERVICES):
            service = services.get(name)
            if service is None:
                continue
            if service.alive():
                _stop_group(service, self.settings.stop_timeout_s if timeout_s is None else timeout_s)
                stopped.append(name)
        self.services = {}
        self.state_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[dict[str, Any]]:
        rows = []
        raw = self._load_raw()
        for name, service in self.load().items():
            alive = service.alive()
            rows.append({
                "service": name, "launcher": "process", "state": "running" if alive else "exited",
                "restarts": raw.get(name, {}).get("restarts", 0),
                "health": ("healthy" if healthy(self.health_url(name)) else "unhealthy") if alive else "-",
                "ports": service.url.removeprefix("http://"), "device": self._device(),
                "memory": f"{human(group_rss(service.pid))} RSS" if alive else "-",
                "id": f"pid {service.pid}", "log": str(service.log),
            })
        return rows

    def _device(self) -> str:
        return self.launch.choice.accelerator if self.launch else "cpu"

    # -- supervision -----------------------------------------------------------------------------------

    def supervise(self, should_stop: Callable[[], bool], poll_s: float = 0.5) -> int:
        """Watch the started services; restart a dead one with backoff, reload a model whose Python stub died
        (:class:`~vlmserve.orchestrator.heal.StubWatcher`, in a thread). Returns 0 when asked to stop, 1 after
        ``max_restarts`` consecutive failed restarts of one service."""
        from vlmserve.orchestrator.heal import StubWatcher

        s = self.settings
        failures = dict.fromkeys(SERVICES, 0)
        started_at = {name: time.monotonic() for name in SERVICES}
        # Healing next to this Triton: a model whose Python stub died is reloaded here (orchestrator/heal.py).
        StubWatcher(s.triton_http_url, self._triton_pid, self.log).start(should_stop)
        while not should_stop():
            for name in SERVICES:
                service = self.services.get(name)
                if service is None or service.alive():
                    if service is not None and time.monotonic() - started_at[name] > STABLE_S:
                        failures[name] = 0
                    continue
                code = _exit_code(service.pid)
                if failures[name] >= s.max_restarts:
                    self.log(f"{name} exited ({code}) and failed {failures[name]} restarts in a row; giving up. "
                             f"Last lines of its log:\n{tail(service.log)}")
                    return 1
                delay = min(s.restart_backoff_s * 2 ** failures[name], s.restart_backoff_max_s)
                failures[name] += 1
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.log(f"{name} exited unexpectedly ({code}); restart {self.restarts[name]} in {delay:.1f}s "
                         f"(attempt {failures[name]}/{s.max_restarts})")
                if sleep_unless(delay, should_stop):
                    return 0
                try:
                    _stop_group(service, 5.0)  # leftovers of the dead one (e.g. Triton's Python stubs)
                    self._start_service(name, append=True)
                    started_at[name] = time.monotonic()
                    self.log(f"{name} restarted and ready")
                except StartupError as exc:
                    self.log(f"restart of {name} failed: {exc}")
            time.sleep(poll_s)
        return 0

    def _triton_pid(self) -> int | None:
        service = self.services.get("triton")
        return service.pid if service is not None and service.alive() else None

    def run_foreground(self) -> int:
        """Start everything, supervise until Ctrl-C/SIGTERM (or restarts are exhausted); always stops both."""
        stop_requested = False
        started = False

        def handler(signum, frame):  # noqa: ARG001
            nonlocal stop_requested
            stop_requested = True
            if not started:  # interrupt a startup wait; the finally below cleans up
                raise KeyboardInterrupt

        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            self.start()
            started = True
            self.log("press Ctrl-C to stop")
            code = self.supervise(lambda: stop_requested)
        except KeyboardInterrupt:
            code = 130
        finally:
            self.log("stopping ...")
            self.stop()
            for sig, h in old.items():
                signal.signal(sig, h)
            self.log("stopped")
        return code

    # -- detached (up / down) --------------------------------------------------------------------------

    def available(self) -> bool:
        return True

    def active(self) -> bool:
        return bool(self.load())

    def up(self, run_args: Sequence[str]) -> list[str]:
        """Start a detached supervisor (``python -m vlmserve.orchestrator run --launcher process ARGS``, this
        command's environment) and wait until both are ready.

        The supervisor is detached on purpose (its own session, not tied to this command); its services die
        with it."""
        if self.supervisor() or {n for n in self.running() if n not in self.orphans()}:
            raise StartupError("already running (process); see `vlmserve status`, or `vlmserve down` first")
        self.clear_stale()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / "supervisor.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "vlmserve.orchestrator", "run", "--launcher", self.name,
                                     *run_args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(os.environ), start_new_session=True)
        self.supervisor_file.write_text(json.dumps({"pid": proc.pid, "log": str(log)}))
        deadline = time.monotonic() + self.settings.ready_timeout_s * 2
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StartupError(f"startup failed; last lines of {log}:\n{tail(log)}")
            running = self.running()
            if set(running) == set(SERVICES) and all(healthy(self.health_url(n)) for n in SERVICES):
                self.log(f"vlmserve is up (process, supervised by pid {proc.pid}): gateway "
                         f"{self.settings.gateway_url}, triton {self.settings.triton_http_url}; log: {log}")
                return list(SERVICES)
            time.sleep(0.5)
        self.down()
        raise StartupError(f"not ready after {self.settings.ready_timeout_s * 2:.0f}s; see {log}")

    def ensure(self, run_args: Sequence[str]) -> list[str]:
        """Nothing when the supervisor is alive and both services are healthy; else ``down``, then ``up``."""
        rows = self.status()
        if self.supervisor() and rows and all(r["health"] == "healthy" for r in rows):
            return []
        self.down()
        return self.up(run_args)

    def down(self) -> list[str]:
        """Stop the supervisor (it stops its services), then anything left over."""
        supervisor = self.supervisor()
        stopped = []
        if supervisor is not None:
            _stop_group(supervisor, self.settings.stop_timeout_s * 2 + 10)
            stopped.append("supervisor")
        self.supervisor_file.unlink(missing_ok=True)
        return stopped + [n for n in self.stop() if n not in stopped]

    def clean(self, volumes: bool = False) -> list[str]:
        """``down``, then remove the run directory's logs and state (not the model repository; no volumes)."""
        removed = [f"process {n}" for n in self.down()]
        for f in sorted(self.run_dir.glob("*.log")) + sorted(self.run_dir.glob("*.json")):
            f.unlink(missing_ok=True)
            removed.append(str(f))
        return removed

    def logs(self, service: str | None = None, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        """Lines of the services' logs (``follow``: keep reading until interrupted)."""
        names = [service] if service else [*SERVICES, "supervisor"]
        files = [(n, self.run_dir / f"{n}.log") for n in names if (self.run_dir / f"{n}.log").exists()]
        if service and not files:
            raise ValueError(f"no log for {service} in {self.run_dir}")
        if follow and len(files) > 1:
            raise ValueError("logs -f follows one service: name it (triton, gateway or supervisor)")
        for name, path in files:
            with open(path, errors="replace") as f:
                lines = f.readlines()
                for line in lines[-tail:] if tail else lines:
                    yield f"{name} | {line.rstrip()}"
                while follow:
                    line = f.readline()
                    if line:
                        yield f"{name} | {line.rstrip()}"
                    else:
                        time.sleep(0.2)


def _create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _port_busy(host: str, port: int) -> bool:
    """Whether a server could not listen on ``host:port`` now (the servers set SO_REUSEADDR too)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _holder(port: int) -> str:
    """`` by pid N (command line)`` for the process listening on ``port``, when this user may see it."""
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f" by pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:160]})"
    except psutil.Error:
        pass
    return ""


def _exit_code(pid: int, timeout_s: float = 5.0) -> str:
    # A killed multi-threaded process shows as a zombie while its other threads still exit, and until they have,
    # waitpid(WNOHANG) returns (0, 0): read as "exit code 0" that would be a lie, so wait (briefly) for the real one.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return "exit status unknown"
        if got == pid:
            break
        if time.monotonic() > deadline:
            return "exit status unknown"
        time.sleep(0.05)
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def group_rss(pid: int) -> int | None:
    """Resident memory of a process and everything in its process group (Triton + its Python stubs)."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return None
    total = 0
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                total += proc.memory_info().rss
        except (psutil.Error, ProcessLookupError):
            continue  # gone meanwhile, or not ours to read
    return total

