"""What starts Triton and the gateway: the :class:`Launcher` protocol that every launcher implements.

A launcher runs the two services somewhere (local processes, Docker containers, ...) and answers the orchestrator's
verbs with one signature each; the commands (:mod:`vlmserve.orchestrator.cli`) know launchers only through this
protocol and pick one by name from :data:`vlmserve.orchestrator.launchers.LAUNCHERS`. A new launcher is one module
under ``orchestrator/launchers/`` and one line in that table.

Also here: what the launchers share (the error the commands report in one line, the services' start order,
the health probe, the tracing environment).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from vlmserve import telemetry
from vlmserve.orchestrator.settings import OrchestratorSettings

if TYPE_CHECKING:
    from vlmserve.orchestrator.launch import Launch

SERVICES = ("triton", "gateway")  # start order; stopped in reverse


class LaunchError(RuntimeError):
    """A launcher could not do what it was asked; the message says why and what to do (the commands print it)."""


class StartupError(LaunchError):
    """A service did not become ready; the message carries the tail of its log."""


class Launcher(Protocol):
    """Triton and the gateway, started and inspected one way. Every method answers for this launcher only."""

    name: str  # its key in LAUNCHERS, shown in the status table
    # True when Triton runs from a vlmserve image: a memory plan then starts from the image's config flavour
    # (native config.pbtxt in the NGC image), else from the settings' (the wheel's tritonserver: embedded).
    in_image: bool
    # The accelerator, image and memory plan of a start (set before up/ensure/run_foreground; None elsewhere).
    launch: Launch | None

    def available(self) -> bool:
        """Whether this launcher can act on this host at all (Docker: an engine answers)."""
        ...

    def active(self) -> bool:
        """Whether it has anything here now (recorded services, containers): ``logs`` skips one that has not."""
        ...

    def up(self, run_args: Sequence[str]) -> list[str]:
        """Start both services detached and supervised, wait until they are healthy; returns what it started.
        ``run_args`` are the ``run`` options a detached supervisor repeats (one that is Docker ignores them)."""
        ...

    def ensure(self, run_args: Sequence[str]) -> list[str]:
        """Start (or restart) only what is not running and healthy; returns what it started."""
        ...

    def run_foreground(self) -> int:
        """Start both, supervise them until Ctrl-C/SIGTERM; nothing outlives this call. Returns the exit code."""
        ...

    def down(self) -> list[str]:
        """Stop what ``up`` started; returns the names that were stopped."""
        ...

    def status(self) -> list[dict[str, Any]]:
        """One row per service: service, launcher, state, restarts, health, ports, device, memory, id, log."""
        ...

    def logs(self, service: str | None, follow: bool, tail: int | None) -> Iterator[str]:
        """The services' log lines (``service | line``); ``follow`` keeps reading; ``tail``: only the last N."""
        ...

    def clean(self, volumes: bool) -> list[str]:
        """``down``, then remove what this launcher created (logs, networks; ``volumes``: its volumes too)."""
        ...


class LauncherFactory(Protocol):
    """How the commands build a launcher (each launcher class is one)."""

    def __call__(self, settings: OrchestratorSettings, *, log: Callable[[str], None] = ...,
                 launch: Launch | None = ...) -> Launcher: ...


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def observability_env(settings: OrchestratorSettings) -> dict[str, str]:
    """What turns tracing on in a service (vlmserve/telemetry.py), from the orchestrator's settings."""
    return {telemetry.OTLP_ENDPOINT_ENV: settings.otlp_endpoint} if settings.otlp_endpoint else {}


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
