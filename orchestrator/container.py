"""Entry point inside the vlmserve images: ``python -m orchestrator.container triton|gateway|health|prepare``.

One image runs either role; the Docker runtime (and ``docker/compose.yaml``) pick it with the command and
``VLMSERVE_ROLE``. The role process is ``exec``'d so that it runs directly under the container's init
(``docker run --init``): when Triton or the gateway dies the container exits with its status and Docker's
restart policy brings it back (with Docker's own exponential backoff).

Kept free of heavy imports: the HEALTHCHECK runs this module every few seconds.
"""

from __future__ import annotations

import os
import shlex
import sys
import urllib.request
from pathlib import Path

# The NGC tritonserver image ships its server here (native onnxruntime/TensorRT backends); the CPU and ROCm
# images use the tritonserver from the nvidia-pytriton wheel (Python backend only).
NGC_TRITON = Path("/opt/tritonserver")

PROBES = {"triton": "/v2/health/ready", "gateway": "/livez"}


def _triton() -> None:
    from orchestrator import triton
    from orchestrator.settings import OrchestratorSettings

    settings = OrchestratorSettings()
    extra = shlex.split(os.environ.get("VLMSERVE_TRITON_EXTRA_ARGS", ""))
    if (NGC_TRITON / "bin" / "tritonserver").exists() and "pytriton" not in os.environ.get("VLMSERVE_TRITON", ""):
        dist = triton.TritonDist(root=NGC_TRITON, libs=NGC_TRITON / "lib")
        cmd, env = triton.triton_command(settings, dist, NGC_TRITON / "backends", extra), dict(os.environ)
    else:
        dist = triton.find_tritonserver()
        backends = triton.prepare_backends(dist, settings.run_path)
        cmd, env = triton.triton_command(settings, dist, backends, extra), triton.triton_env(dist)
    print("vlmserve: exec " + " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, env)


def _gateway() -> None:
    os.execv(sys.executable, [sys.executable, "-m", "gateway"])


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
    from orchestrator import triton
    from orchestrator.settings import OrchestratorSettings

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
    print("usage: python -m orchestrator.container triton|gateway|health|prepare", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
