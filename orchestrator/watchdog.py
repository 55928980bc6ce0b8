"""``python -m vlmserve.orchestrator.watchdog FD LABEL=VALUE...``: wait for EOF on FD, then remove the labelled
containers.

Started by :class:`vlmserve.orchestrator.lifetime.Watchdog`, which holds the pipe's other end: EOF means that process
ended (or closed it); a line ``release`` before EOF means "leave them running".
"""

from __future__ import annotations

import contextlib
import os
import sys


def main(argv: list[str]) -> int:
    fd, filters = int(argv[0]), argv[1:]
    data = b""
    while chunk := os.read(fd, 64):
        data += chunk
    if data.strip() == b"release":
        return 0
    import docker.errors

    from vlmserve.orchestrator.launchers.docker import DockerUnavailable, docker_client

    try:
        client = docker_client()
    except DockerUnavailable as exc:
        print(f"watchdog: {exc}", file=sys.stderr)
        return 1
    labels = {"label": filters}
    for container in client.containers.list(all=True, filters=labels):
        print(f"watchdog: its supervisor ended; removing container {container.name}", file=sys.stderr)
        with contextlib.suppress(docker.errors.NotFound):  # removed meanwhile (a `down`)
            container.remove(force=True)
    for network in client.networks.list(filters=labels):
        with contextlib.suppress(docker.errors.NotFound):
            network.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
