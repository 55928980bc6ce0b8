"""Entry point inside the vlmserve images: ``python -m vlmserve.orchestrator.container triton|gateway|health|prepare``.

One image runs either role; the Docker launcher (and ``docker/compose.yaml``) pick it with the command and
``VLMSERVE_ROLE``. The gateway is ``exec``'d. The Triton role is a small supervisor: tritonserver runs as its child
(SIGTERM/SIGINT forwarded to it), a :class:`~vlmserve.orchestrator.heal.StubWatcher` beside it reloads a model whose
Python
stub died on this Triton only, and the role exits with tritonserver's status, so when Triton dies the container
exits and Docker's (Swarm's, Kubernetes') restart policy brings it back (with its own exponential backoff).

Kept free of heavy imports: the HEALTHCHECK runs this module every few seconds.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

# The NGC tritonserver image ships its server here (native onnxruntime/TensorRT backends); the CPU and ROCm
# images use the tritonserver from the nvidia-pytriton wheel (Python backend only).
NGC_TRITON = Path("/opt/tritonserver")

PROBES = {"triton": "/v2/health/ready", "gateway": "/livez"}


def _triton() -> None:
    from vlmserve.orchestrator import triton
    from vlmserve.orchestrator.settings import OrchestratorSettings

    settings = OrchestratorSettings()
    extra = shlex.split(os.environ.get("VLMSERVE_TRITON_EXTRA_ARGS", ""))
    if (NGC_TRITON / "bin" / "tritonserver").exists() and "pytriton" not in os.environ.get("VLMSERVE_TRITON", ""):
        dist = triton.TritonDist(root=NGC_TRITON, libs=NGC_TRITON / "lib")
        cmd, env = triton.triton_command(settings, dist, NGC_TRITON / "backends", extra), dict(os.environ)
    else:
        dist = triton.find_tritonserver()
        backends = triton.prepare_backends(dist, settings.run_path)
        cmd, env = triton.triton_command(settings, dist, backends, extra), triton.triton_env(dist)
    print("vlmserve: run " + " ".join(cmd), flush=True)
    sys.exit(supervise_triton(cmd, env, f"http://127.0.0.1:{settings.http_port}"))


def supervise_triton(cmd: list[str], env: dict[str, str], url: str) -> int:
    """Run tritonserver as a child with the stub watcher beside it; its exit status (128 + signal if killed)."""
    from vlmserve.orchestrator.heal import StubWatcher

    # Handlers first, so that no stop signal can end this process and leave tritonserver behind; also, as PID 1
    # in a pod without an init, a signal without a handler would do nothing.
    pending: list[int] = []
    children: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            child.send_signal(signum)
        if not children:
            pending.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    server = subprocess.Popen(cmd, env=env)
    children.append(server)
    for signum in pending:
        server.send_signal(signum)
    watcher = StubWatcher(url, lambda: server.pid if server.poll() is None else None,
                          lambda m: print(f"vlmserve: {m}", flush=True))
    watcher.start(lambda: server.poll() is not None)
    code = server.wait()
    return 128 - code if code < 0 else code


def _gateway() -> None:
    os.execv(sys.executable, [sys.executable, "-m", "vlmserve.gateway"])


def probe(role: str, port: int, timeout: float = 3.0) -> bool:
    """True when the role's readiness endpoint answers 200 on localhost."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{PROBES[role]}", timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _health() -> int:
    role = os.environ.get("VLMSERVE_ROLE", "")
    if role not in PROBES:
        print(f"VLMSERVE_ROLE must be one of {', '.join(PROBES)}, not {role!r}", file=sys.stderr)
        return 2
    port = int(os.environ.get("VLMSERVE_HTTP_PORT" if role == "triton" else "VLMSERVE_GATEWAY_PORT",
                              "8000" if role == "triton" else "8080"))
    return 0 if probe(role, port) else 1


def _prepare() -> None:
    """At image build time: the writable backend directory with the Python stub (saves work at start)."""
    from vlmserve.orchestrator import triton
    from vlmserve.orchestrator.settings import OrchestratorSettings

    print(triton.prepare_backends(triton.find_tritonserver(), OrchestratorSettings().run_path))


def main(argv: list[str]) -> int:
    command = argv[0] if argv else os.environ.get("VLMSERVE_ROLE", "")
    if command == "triton":
        _triton()
    elif command == "gateway":
        _gateway()
    elif command == "health":
        return _health()
    elif command == "prepare":
        _prepare()
        return 0
    print("usage: python -m vlmserve.orchestrator.container triton|gateway|health|prepare", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
