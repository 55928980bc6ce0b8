"""The ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel: find it, make it runnable, build its command.

The wheel's server has only the Python backend. It needs a writable backend directory holding the
``triton_python_backend_stub`` built for our Python version and the wheel's bundled shared libraries on
``LD_LIBRARY_PATH``. We never import ``pytriton`` itself (it needs extra dependencies we do not use).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import sys
from dataclasses import dataclass
from pathlib import Path

from vlmserve import paths, telemetry
from vlmserve.orchestrator.launcher import LaunchError
from vlmserve.orchestrator.settings import OrchestratorSettings

# How long tritonserver waits for in-flight requests when asked to stop; a supervisor (Docker, Kubernetes'
# terminationGracePeriodSeconds) must wait longer before it kills.
EXIT_TIMEOUT_S = 10


class TritonNotFound(LaunchError):
    """No usable tritonserver: the message says what to install."""


@dataclass(frozen=True)
class TritonDist:
    root: Path  # site-packages/pytriton/tritonserver
    libs: Path  # site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    def stub(self, python: str = f"{sys.version_info.major}.{sys.version_info.minor}") -> Path:
        return self.root / "python_backend_stubs" / python / "triton_python_backend_stub"


def find_tritonserver() -> TritonDist:
    """Locate the wheel's server without importing ``pytriton``."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFound(
            "tritonserver not found: install it with `pip install --no-deps nvidia-pytriton` "
            "(`make demo` does this for you)"
        )
    pkg = Path(next(iter(spec.submodule_search_locations)))
    dist = TritonDist(root=pkg / "tritonserver", libs=pkg.parent / "nvidia_pytriton.libs")
    if not dist.binary.exists():
        raise TritonNotFound(f"{dist.binary} missing: the nvidia-pytriton install looks broken, reinstall it")
    if not dist.stub().exists():
        raise TritonNotFound(f"no Python backend stub for Python {sys.version_info[:2]} in {dist.root}")
    return dist


def prepare_backends(dist: TritonDist, run_dir: Path) -> Path:
    """A writable copy of the backend directory with the stub for this Python in ``backends/python``."""
    backends = run_dir / "backends"
    python_dir = backends / "python"
    marker = python_dir / ".source"
    source = f"{dist.root}:{dist.stub().stat().st_mtime_ns}"
    if marker.exists() and marker.read_text() == source:
        return backends
    if backends.exists():
        shutil.rmtree(backends)
    shutil.copytree(dist.root / "backends", backends)
    shutil.copy2(dist.stub(), python_dir / "triton_python_backend_stub")
    marker.write_text(source)
    return backends


def triton_command(
    settings: OrchestratorSettings, dist: TritonDist, backends: Path, extra_args: list[str] | None = None
) -> list[str]:
    """The tritonserver command line; ``extra_args`` come from the GPU memory plan (``--model-load-gpu-limit``)."""
    config_name = [f"--model-config-name={settings.model_config_name}"] if settings.model_config_name else []
    return [
        str(dist.binary),
        f"--model-repository={settings.repository_path}",
        f"--backend-directory={backends}",
        *config_name,
        f"--http-address={settings.host}",
        f"--http-port={settings.http_port}",
        f"--grpc-address={settings.host}",
        f"--grpc-port={settings.grpc_port}",
        f"--metrics-address={settings.host}",
        f"--metrics-port={settings.metrics_port}",
        "--allow-metrics=true",
        # Explicit model control with every model loaded at start: the same models as the default mode, and the
        # stub watcher beside this Triton (orchestrator/heal.py) may unload + load a model whose Python stub died.
        "--model-control-mode=explicit",
        "--load-model=*",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        "--log-verbose=0",
        *trace_args(settings.otlp_endpoint),
        *(extra_args or []),
    ]


def trace_args(otlp_endpoint: str | None) -> list[str]:
    """Triton's OpenTelemetry trace mode, every request at TIMESTAMPS level, exporting to the collector's OTLP/HTTP
    traces URL; the gateway's ``traceparent`` header makes Triton's spans children of its Triton call."""
    if not otlp_endpoint:
        return []
    return ["--trace-config=mode=opentelemetry", "--trace-config=rate=1", "--trace-config=level=TIMESTAMPS",
            f"--trace-config=opentelemetry,url={telemetry.traces_url(otlp_endpoint)}",
            "--trace-config=opentelemetry,resource=service.name=vlmserve-triton"]


def triton_env(dist: TritonDist) -> dict[str, str]:
    """Environment for tritonserver: bundled libs, and a Python path that finds our model code."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(dist.libs), env.get("LD_LIBRARY_PATH")]))
    # The stub embeds its own interpreter; point it at this environment's packages and the project.
    python_path = [str(paths.PROJECT_ROOT), *site.getsitepackages(), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, python_path))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
