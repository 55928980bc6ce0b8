"""The ``process`` runtime: tritonserver and the gateway as local child processes.

Each service runs in its own session (process group), so stopping it also stops what it started
(Triton's Python stubs). A ``services.json`` in the run directory records what is running so that
``python -m orchestrator stop|status`` work from another terminal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from orchestrator import triton
from orchestrator.settings import OrchestratorSettings


class StartupError(RuntimeError):
    """A service did not become ready; the message carries the tail of its log."""


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


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


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
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class ProcessRuntime:
    def __init__(self, settings: OrchestratorSettings, log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.log = log
        self.run_dir = settings.run_path
        self.services: dict[str, Service] = {}

    # -- state file ------------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.run_dir / "services.json"

    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = {n: {"pid": s.pid, "log": str(s.log), "url": s.url} for n, s in self.services.items()}
        self.state_file.write_text(json.dumps(data, indent=2))

    def load(self) -> dict[str, Service]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return {n: Service(n, d["pid"], Path(d["log"]), d["url"]) for n, d in data.items()}

    # -- start -----------------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], url: str) -> Service:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
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
            if _healthy(health_url):
                return
            time.sleep(0.5)
        raise StartupError(
            f"{service.name} not ready after {self.settings.ready_timeout_s:.0f}s ({health_url}). "
            f"Last lines of {service.log}:\n{tail(service.log)}"
        )

    def running(self) -> dict[str, Service]:
        return {n: s for n, s in self.load().items() if s.alive()}

    def start(self) -> dict[str, Service]:
        """Start Triton, wait until it is ready, then the gateway; raises StartupError (after cleanup)."""
        already = self.running()
        if already:
            raise StartupError(
                f"already running: {', '.join(already)} (see `python -m orchestrator status`; stop it first)"
            )
        s = self.settings
        if not (s.repository_path.exists() and any(s.repository_path.glob("*/config.pbtxt"))):
            raise StartupError(f"model repository {s.repository_path} is empty: run `vlmserve export` first")
        dist = triton.find_tritonserver()
        backends = triton.prepare_backends(dist, self.run_dir)
        try:
            self.log(f"starting tritonserver on {s.host} (http {s.http_port}, grpc {s.grpc_port}, "
                     f"metrics {s.metrics_port}); log: {self.run_dir / 'triton.log'}")
            tsrv = self._spawn("triton", triton.triton_command(s, dist, backends), triton.triton_env(dist),
                               s.triton_http_url)
            self._wait_ready(tsrv, f"{s.triton_http_url}/v2/health/ready")
            self.log(f"triton ready; starting gateway on {s.gateway_url}")
            env = dict(os.environ)
            env.update({
                "VLMSERVE_GATEWAY_HOST": s.gateway_host,
                "VLMSERVE_GATEWAY_PORT": str(s.gateway_port),
                "VLMSERVE_GATEWAY_TRITON_URL": f"{s.host}:{s.http_port}",
                "VLMSERVE_GATEWAY_TRITON_GRPC_URL": f"{s.host}:{s.grpc_port}",
            })
            gw = self._spawn("gateway", [sys.executable, "-m", "gateway"], env, s.gateway_url)
            self._wait_ready(gw, f"{s.gateway_url}/livez")
        except BaseException:
            self.stop()
            raise
        self.log(f"vlmserve is up: gateway {s.gateway_url}, triton {s.triton_http_url}")
        return self.services

    # -- stop / status ---------------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop the gateway, then Triton; returns the names that were stopped."""
        services = {**self.load(), **self.services}
        stopped = []
        for name in ("gateway", "triton"):
            service = services.get(name)
            if service is None:
                continue
            if service.alive():
                _stop_group(service, self.settings.stop_timeout_s)
                stopped.append(name)
        self.services = {}
        self.state_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for name, service in self.load().items():
            alive = service.alive()
            probe = "/v2/health/ready" if name == "triton" else "/livez"
            rows.append({
                "service": name, "runtime": "process", "pid": service.pid,
                "state": "running" if alive else "exited",
                "health": ("healthy" if _healthy(service.url + probe) else "unhealthy") if alive else "-",
                "url": service.url, "log": str(service.log),
            })
        return rows

    def run_foreground(self) -> int:
        """Start everything and block until Ctrl-C/SIGTERM or a service dies; always stops both."""
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
            while not stop_requested:
                dead = [n for n, s in self.services.items() if not s.alive()]
                if dead:
                    self.log(f"{', '.join(dead)} exited unexpectedly; last lines of its log:\n"
                             f"{tail(self.services[dead[0]].log)}")
                    code = 1
                    break
                time.sleep(0.5)
        except KeyboardInterrupt:
            code = 130
        finally:
            self.log("stopping ...")
            self.stop()
            for sig, h in old.items():
                signal.signal(sig, h)
            self.log("stopped")
        return code
