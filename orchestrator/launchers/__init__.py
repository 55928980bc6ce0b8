"""The launchers, by name: the only place that names them (``vlmserve up --launcher NAME``, ``VLMSERVE_LAUNCHER``).

Each implements :class:`vlmserve.orchestrator.launcher.Launcher`; the typed table below is how mypy checks that.
Adding one: a module here and a line in :data:`LAUNCHERS`.
"""

from __future__ import annotations

from vlmserve.orchestrator.launcher import LauncherFactory
from vlmserve.orchestrator.launchers.docker import DockerLauncher
from vlmserve.orchestrator.launchers.process import ProcessLauncher

LAUNCHERS: dict[str, LauncherFactory] = {
    "process": ProcessLauncher,  # local child processes (the default)
    "docker": DockerLauncher,  # two containers of one vlmserve image, through the Docker Engine API
}
