"""The ``docker`` launcher: Triton and the gateway as two containers of one vlmserve image.

Everything this launcher creates carries the labels ``io.vlmserve.managed=true`` and
``io.vlmserve.project=<project>``; ``down`` and ``clean`` remove only what carries them. Supervision is
Docker's: containers run with ``--init`` and the ``on-failure`` restart policy, so a crashed Triton or gateway
(the role process is the init's only child) is restarted with Docker's exponential backoff; ``status``
shows the restart count and ``logs`` the container's output across restarts.

Containers are nobody's children: while ``up`` starts them, a watchdog
(:class:`vlmserve.orchestrator.lifetime.Watchdog`)
removes them if ``up`` dies before both are healthy (SIGKILL, a crash); once they are, ``up`` releases them to
Docker's supervision, like ``docker compose up -d``. ``run --launcher docker`` keeps them tied for its whole life.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from vlmserve.orchestrator.images import LABEL
from vlmserve.orchestrator.launch import Launch
from vlmserve.orchestrator.launcher import SERVICES, LaunchError, StartupError, healthy, human, observability_env
from vlmserve.orchestrator.lifetime import Watchdog
from vlmserve.orchestrator.settings import OrchestratorSettings

PROJECT_LABEL = "io.vlmserve.project"
SERVICE_LABEL = "io.vlmserve.service"
ACCELERATOR_LABEL = "io.vlmserve.accelerator"
# Fixed ports inside the containers; the host side comes from the settings.
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
GATEWAY_PORT = 8080
# Host variables handed to the containers as they are (the gateway's whole configuration, HF offline mode).
PASS_THROUGH_PREFIXES = ("VLMSERVE_GATEWAY_", "HF_HUB_OFFLINE", "HF_TOKEN", "TRANSFORMERS_OFFLINE",
                         "VLMSERVE_LOG_FORMAT", "OTEL_")
PASS_THROUGH_SKIP = {"VLMSERVE_GATEWAY_HOST", "VLMSERVE_GATEWAY_PORT", "VLMSERVE_GATEWAY_TRITON_URL",
                     "VLMSERVE_GATEWAY_TRITON_GRPC_URL"}


class DockerUnavailable(LaunchError):
    """No Docker Engine to talk to; the message says how to get one."""


def docker_client() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=300)  # type: ignore[attr-defined]
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - the SDK raises several unrelated types for "no engine"
        raise DockerUnavailable(
            f"cannot reach a Docker Engine ({exc}). Install and start one (Debian: `apt-get install docker.io` "
            "then `dockerd &`), or use --launcher process"
        ) from None


class DockerLauncher:
    """Implements :class:`~vlmserve.orchestrator.launcher.Launcher`."""

    name = "docker"
    in_image = True  # the image's config flavour: native config.pbtxt in the NGC image, embedded otherwise

    def __init__(self, settings: OrchestratorSettings, log: Callable[[str], None] = print,
                 client: Any = None, launch: Launch | None = None) -> None:
        self.settings = settings
        self.log = log
        self._client = client
        self.launch = launch

    # -- names and lookups -----------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = docker_client()
        return self._client

    def container_name(self, service: str) -> str:
        return f"{self.settings.project}-{service}"

    @property
    def network_name(self) -> str:
        return f"{self.settings.project}-net"

    def labels(self, service: str | None = None) -> dict[str, str]:
        labels = {LABEL: "true", PROJECT_LABEL: self.settings.project}
        if service:
            labels[SERVICE_LABEL] = service
            if self.launch:
                labels[ACCELERATOR_LABEL] = self.launch.choice.accelerator
        return labels

    def _filters(self) -> dict[str, list[str]]:
        return {"label": [f"{LABEL}=true", f"{PROJECT_LABEL}={self.settings.project}"]}

    def containers(self) -> dict[str, Any]:
        """This project's containers by service name (any state)."""
        found = self.client.containers.list(all=True, filters=self._filters())
        return {c.labels.get(SERVICE_LABEL, c.name): c for c in found}

    def image_tag(self) -> str:
        if self.settings.image:
            return self.settings.image
        return f"vlmserve:{self.launch.choice.image if self.launch else 'cpu'}"

    # -- container specs -------------------------------------------------------------------------------

    def _pass_through_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items()
                if k.startswith(PASS_THROUGH_PREFIXES) and k not in PASS_THROUGH_SKIP}

    def _device_options(self) -> dict[str, Any]:
        accelerator = self.launch.choice.accelerator if self.launch else "cpu"
        if accelerator == "cuda":
            import docker.types

            env = self.launch.env() if self.launch else {}
            ids = env.get("CUDA_VISIBLE_DEVICES")
            request = (docker.types.DeviceRequest(device_ids=ids.split(","), capabilities=[["gpu"]]) if ids
                       else docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]]))
            return {"device_requests": [request]}
        if accelerator == "rocm":
            # AMD's documented container access: the KFD compute interface and the DRI render nodes.
            return {"devices": ["/dev/kfd:/dev/kfd:rwm", "/dev/dri:/dev/dri:rwm"], "group_add": ["video"],
                    "security_opt": ["seccomp=unconfined"]}
        return {}

    def spec(self, service: str) -> dict[str, Any]:
        """Keyword arguments for ``containers.run`` (also what the unit tests check)."""
        s = self.settings
        common: dict[str, Any] = {
            "image": self.image_tag(), "name": self.container_name(service), "labels": self.labels(service),
            "detach": True, "init": True, "network": self.network_name,
            "restart_policy": {"Name": "on-failure", "MaximumRetryCount": s.max_restarts},
            "environment": {**self._pass_through_env(), "VLMSERVE_ROLE": service, **observability_env(s)},
        }
        if service == "triton":
            launch = self.launch
            config_name = launch.model_config_name(launch.choice.model_config_name) if launch else "embedded"
            common["environment"].update({
                "VLMSERVE_MODEL_CONFIG_NAME": config_name or "",
                "VLMSERVE_TRITON_EXTRA_ARGS": " ".join(launch.triton_args()) if launch else "",
                **(launch.env() if launch else {}),
            })
            return {
                **common, "command": ["triton"], "shm_size": s.shm_size,
                "volumes": {str(s.repository_path): {"bind": "/models", "mode": "ro"},
                            s.hf_cache_volume: {"bind": "/hf-cache", "mode": "rw"}},
                "ports": {f"{TRITON_PORTS['http']}/tcp": (s.host, s.http_port),
                          f"{TRITON_PORTS['grpc']}/tcp": (s.host, s.grpc_port),
                          f"{TRITON_PORTS['metrics']}/tcp": (s.host, s.metrics_port)},
                **self._device_options(),
            }
        if service == "gateway":
            triton = self.container_name("triton")
            common["environment"].update({
                "VLMSERVE_GATEWAY_TRITON_URL": f"{triton}:{TRITON_PORTS['http']}",
                "VLMSERVE_GATEWAY_TRITON_GRPC_URL": f"{triton}:{TRITON_PORTS['grpc']}",
            })
            return {**common, "command": ["gateway"],
                    "ports": {f"{GATEWAY_PORT}/tcp": (s.gateway_host, s.gateway_port)}}
        raise ValueError(f"unknown service {service!r}; services: {', '.join(SERVICES)}")

    def health_url(self, service: str) -> str:
        if service == "triton":
            return f"{self.settings.triton_http_url}/v2/health/ready"
        return f"{self.settings.gateway_url}/livez"

    # -- lifecycle ------------------------------------------------------------------------------------

    def _ensure_network(self) -> None:
        if not self.client.networks.list(names=[self.network_name], filters=self._filters()):
            self.client.networks.create(self.network_name, driver="bridge", labels=self.labels())

    def _require_image(self) -> None:
        import docker.errors

        try:
            self.client.images.get(self.image_tag())
        except docker.errors.ImageNotFound:
            image = self.launch.choice.image if self.launch else "cpu"
            raise StartupError(f"image {self.image_tag()} not found: build it with "
                               f"`vlmserve image build --image {image}`") from None

    def _wait_ready(self, service: str, container: Any) -> None:
        deadline = time.monotonic() + self.settings.ready_timeout_s
        url = self.health_url(service)
        while time.monotonic() < deadline:
            container.reload()
            state = container.attrs["State"]
            if state["Status"] in ("exited", "dead") and not state.get("Restarting"):
                raise StartupError(f"{service} container exited during startup (code {state['ExitCode']}). "
                                   f"Last lines of its log:\n{self.tail(service)}")
            if healthy(url):
                return
            time.sleep(0.5)
        raise StartupError(f"{service} not ready after {self.settings.ready_timeout_s:.0f}s ({url}). "
                           f"Last lines of its log:\n{self.tail(service)}")

    def _ishealthy(self, service: str, container: Any) -> bool:
        return bool(container.status == "running" and healthy(self.health_url(service)))

    def _start_service(self, service: str, existing: Any | None) -> Any:
        if existing is not None:
            existing.remove(force=True)  # a stale/unhealthy one: recreate from the current spec
        self.log(f"starting container {self.container_name(service)} ({self.image_tag()})")
        return self.client.containers.run(**self.spec(service))

    def available(self) -> bool:
        try:
            self.client  # noqa: B018 - probe for an engine; without one there is nothing of ours in Docker
        except DockerUnavailable:
            return False
        return True

    def active(self) -> bool:
        return bool(self.containers())

    def ensure(self, run_args: Sequence[str] = ()) -> list[str]:
        """Start (or recreate) only the services that are not running and healthy; returns their names.
        (``run_args``: unused, Docker supervises the containers.)"""
        if not self.settings.repository_path.is_dir():
            raise StartupError(f"model repository {self.settings.repository_path} is missing: "
                               "run `vlmserve export` first")
        self._require_image()
        self._ensure_network()
        started = []
        current = self.containers()
        try:
            for service in SERVICES:
                container = current.get(service)
                if container is not None and self._ishealthy(service, container):
                    continue
                # Triton's restart makes the gateway reconnect by itself; no need to touch a healthy gateway.
                container = self._start_service(service, container)
                started.append(service)
                self._wait_ready(service, container)
        except BaseException:
            if started and not current:  # a fresh `up` that failed: leave nothing half-started
                self.down()
            raise
        return started

    def up(self, run_args: Sequence[str] = ()) -> list[str]:
        """Start both containers and wait until they are healthy; then they are Docker's to supervise.
        (``run_args``: unused, there is no supervisor process to hand them to.)"""
        watchdog = Watchdog(self.labels())  # removes what this start created if this process dies before it ends
        try:
            return self._up()
        finally:
            watchdog.release()  # healthy: Docker supervises them; failed: ensure() has removed them already

    def _up(self) -> list[str]:
        running = [n for n, c in self.containers().items() if c.status == "running"]
        if running:
            raise StartupError(f"already running (docker): {', '.join(running)}; use `ensure` or `restart`")
        started = self.ensure()
        self.log(f"vlmserve is up (docker): gateway {self.settings.gateway_url}, "
                 f"triton {self.settings.triton_http_url}")
        return started

    def run_foreground(self) -> int:
        """``run --launcher docker``: start both containers and keep them only while this process lives. Ctrl-C or
        SIGTERM removes them (``down``); so does this process's death, SIGKILL included (the watchdog)."""
        started = False

        def interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001
            raise KeyboardInterrupt

        old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        watchdog = Watchdog(self.labels())
        try:
            self._up()
            started = True
            self.log("press Ctrl-C to stop (the containers are removed)")
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0 if started else 130
        finally:
            self.log("stopping ...")
            try:
                self.down()
            finally:
                watchdog.finish()  # it removes whatever down() did not (nothing, normally)
                for sig, handler in old.items():
                    signal.signal(sig, handler)
            self.log("stopped")

    def down(self) -> list[str]:
        """Stop and remove this project's containers (gateway first) and its network."""
        stopped = []
        current = self.containers()
        for service in reversed(SERVICES):
            container = current.pop(service, None)
            if container is not None:
                container.stop(timeout=int(self.settings.stop_timeout_s))
                container.remove(force=True)
                stopped.append(service)
        for container in current.values():  # anything else labelled for this project
            container.remove(force=True)
        for network in self.client.networks.list(filters=self._filters()):
            network.remove()
        return stopped

    def clean(self, volumes: bool = False) -> list[str]:
        """Remove every container and network labelled for this project (and its volumes if asked)."""
        removed = [f"container {c.name}" for c in self.containers().values()]
        for container in self.containers().values():
            container.remove(force=True)
        for network in self.client.networks.list(filters=self._filters()):
            removed.append(f"network {network.name}")
            network.remove()
        if volumes:
            for volume in self.client.volumes.list(filters={"name": self.settings.hf_cache_volume}):
                if volume.name == self.settings.hf_cache_volume:
                    removed.append(f"volume {volume.name}")
                    volume.remove(force=True)
        return removed

    # -- inspection -----------------------------------------------------------------------------------

    def running(self) -> dict[str, Any]:
        return {n: c for n, c in self.containers().items() if c.status == "running"}

    def tail(self, service: str, lines: int = 40) -> str:
        container = self.containers().get(service)
        if container is None:
            return "(no container)"
        return container.logs(tail=lines).decode(errors="replace")

    def logs(self, service: str | None = None, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        containers = self.containers()
        if not containers:
            return  # nothing of ours in Docker (stopped and removed): no logs, not an error
        names = [service] if service else [n for n in SERVICES if n in containers]
        for name in names:
            if name not in containers:
                raise ValueError(f"no {name} container (docker); running: {', '.join(containers) or 'none'}")
        if follow and len(names) > 1:
            raise ValueError("logs -f follows one service: name it (triton or gateway)")
        for name in names:
            stream = containers[name].logs(stream=True, follow=follow, tail=tail or "all")
            buffer = b""
            for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield f"{name} | {line.decode(errors='replace')}"
            if buffer:
                yield f"{name} | {buffer.decode(errors='replace')}"

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for service, c in self.containers().items():
            state = c.attrs["State"]
            health = state.get("Health", {}).get("Status", "-") if c.status == "running" else "-"
            ports = []
            for inner, binds in (c.attrs["NetworkSettings"].get("Ports") or {}).items():
                for b in binds or []:
                    ports.append(f"{b['HostIp']}:{b['HostPort']}->{inner.split('/')[0]}")
            used = limit = None
            if c.status == "running":
                stats = c.stats(stream=False, one_shot=True)
                used = stats.get("memory_stats", {}).get("usage")
                limit = c.attrs["HostConfig"].get("Memory") or None
            rows.append({
                "service": service, "launcher": "docker", "state": c.status,
                "restarts": c.attrs.get("RestartCount", 0), "health": health, "ports": ", ".join(sorted(ports)),
                "device": c.labels.get(ACCELERATOR_LABEL, "cpu"),
                "memory": f"{human(used)} / {human(limit) if limit else 'no limit'}",
                "id": c.short_id, "log": f"docker logs {c.name}",
            })
        return sorted(rows, key=lambda r: SERVICES.index(r["service"]) if r["service"] in SERVICES else 99)
