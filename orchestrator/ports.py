"""Free TCP ports on the loopback interface (for side-by-side runs and tests)."""

from __future__ import annotations

import socket
import threading
from typing import TypedDict

# Ports this process has already handed out. The kernel may give the same port to two bind(0) calls in a row once
# the first socket is closed, and a stack needs its HTTP, gRPC, metrics and gateway ports distinct (Triton refuses
# to start when HTTP and metrics share one), so a port is never handed out twice.
_given: set[int] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A loopback port that is free now and that no earlier call in this process returned."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with _lock:
            if port not in _given:
                _given.add(port)
                return port


class StackPorts(TypedDict):
    """The ports of one stack, as :class:`~vlmserve.orchestrator.settings.OrchestratorSettings` keyword arguments."""

    http_port: int
    grpc_port: int
    metrics_port: int
    gateway_port: int


def stack_ports() -> StackPorts:
    """Free, distinct ports for one stack: Triton HTTP, gRPC, metrics and the gateway."""
    return StackPorts(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      gateway_port=free_port())


def stack_port_env(ports: StackPorts) -> dict[str, str]:
    """The same ports as the ``VLMSERVE_*`` environment the orchestrator's CLI reads."""
    return {f"VLMSERVE_{name.upper()}": str(port) for name, port in ports.items()}
