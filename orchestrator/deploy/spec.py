"""What one vlmserve replica is, for deployments on other machines (Kubernetes, Docker Swarm).

Nothing here is a hand-kept copy: the image and model-config flavour per accelerator come from
:mod:`vlmserve.orchestrator.hardware`, the GPU memory plan's knobs from :mod:`vlmserve.orchestrator.memory`, the
containers'
environment, ports and commands from the Docker launcher's own container specs
(:meth:`vlmserve.orchestrator.launchers.docker.DockerLauncher.spec`), the health endpoints from
:mod:`vlmserve.orchestrator.container` and Triton's exit timeout from :mod:`vlmserve.orchestrator.triton`. Both
renderers
(:mod:`vlmserve.orchestrator.deploy.k8s`, :mod:`vlmserve.orchestrator.deploy.swarm`) start from :func:`prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmserve import telemetry
from vlmserve.orchestrator import hardware, memory
from vlmserve.orchestrator.container import PROBES
from vlmserve.orchestrator.launch import Launch
from vlmserve.orchestrator.launchers.docker import GATEWAY_PORT, TRITON_PORTS, DockerLauncher
from vlmserve.orchestrator.settings import OrchestratorSettings
from vlmserve.orchestrator.triton import EXIT_TIMEOUT_S

# `--accelerator` values of `vlmserve deploy` (the overlay names are the image names: cpu, gpu, rocm).
ACCELERATORS = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "rocm": "rocm"}
VARIANTS = ("cpu", "gpu", "rocm")
# The device plugins' resource names (NVIDIA's k8s-device-plugin / GPU operator, AMD's k8s-device-plugin).
GPU_RESOURCES = {"cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu"}
NAME = "vlmserve"  # object name prefix; also the project whose container names the gateway's Triton URL uses
TRITON_LIVE_PATH = "/v2/health/live"  # Triton's liveness endpoint (readiness is PROBES["triton"])
# Kubernetes/Swarm wait this much longer than tritonserver's own --exit-timeout-secs before they kill it.
GRACE_MARGIN_S = 20
PLAN_MOUNT = "/etc/vlmserve/plan"
PLAN_FILE = "plan.yaml"
# The gateways' shared object store (/v1/predict's kept images): a ReadWriteMany claim (Kubernetes), a volume (Swarm).
FILES_MOUNT = "/var/lib/vlmserve/files"


TRITON_RECONNECT_S = 30
DRAIN_DELAY_S = 5  # the gateway's readiness-first drain delay behind a balancer (gateway/__main__.py)
DRAIN_TIMEOUT_S = 15  # then at most this long for requests in progress (the gateway's own default)


class DeployError(ValueError):
    """A deployment that cannot be rendered as asked; the message says what to change."""


@dataclass
class Replica:
    """One Triton + gateway replica: image, accelerator, the memory plan's knobs, the containers' env."""

    variant: str  # cpu | gpu | rocm (the image and the overlay name)
    launch: Launch
    image: str
    gpus: int  # GPUs per Triton pod/container (0 on CPU)
    plan_text: str | None = None  # the plan file as given (mounted into the pod; the init container renders it)
    notes: list[str] = field(default_factory=list)

    @property
    def accelerator(self) -> str:
        return self.launch.choice.accelerator

    @property
    def gpu_resource(self) -> str | None:
        return GPU_RESOURCES.get(self.accelerator)

    @property
    def base_config(self) -> str:
        """The config flavour the plan starts from: the image's own (``native`` in the NGC image)."""
        return self.launch.choice.model_config_name or "native"

    def _docker(self) -> DockerLauncher:
        settings = OrchestratorSettings(project=NAME, image=self.image)
        return DockerLauncher(settings, log=lambda _m: None, client=object(), launch=self.launch)

    def env(self, service: str) -> dict[str, str]:
        """The container environment of ``service`` exactly as the Docker launcher gives it, less what the Docker
        launcher copies from the local shell (a cluster gets its settings from its own manifests)."""
        docker = self._docker()
        env: dict[str, str] = dict(docker.spec(service)["environment"])
        for key in docker._pass_through_env():
            env.pop(key, None)
        env.pop(telemetry.OTLP_ENDPOINT_ENV, None)  # this shell's collector is not the cluster's
        if service == "gateway":
            # The image's defaults bind to 127.0.0.1 outside containers; be explicit.
            env["VLMSERVE_GATEWAY_HOST"] = "0.0.0.0"  # noqa: S104 - a container's service port
            env["VLMSERVE_GATEWAY_PORT"] = str(GATEWAY_PORT)
            # Triton is several replicas behind one name here: reopen its connections every 30 s, so that a
            # replica that comes back or is added gets its share (gateway/backends/triton/client.py,
            # TritonClient.reconnect_s).
            env["VLMSERVE_GATEWAY_TRITON_RECONNECT_S"] = str(TRITON_RECONNECT_S)
            # Behind a balancer: on SIGTERM turn unready first and keep serving while it stops routing here.
            env["VLMSERVE_GATEWAY_DRAIN_DELAY_S"] = str(DRAIN_DELAY_S)
            env["VLMSERVE_GATEWAY_DRAIN_TIMEOUT_S"] = str(DRAIN_TIMEOUT_S)
        return env

    @property
    def triton_service_host(self) -> str:
        """The host name the gateway's Triton URL names (``vlmserve-triton``): the Service/stack service name."""
        return self._docker().container_name("triton")

    @property
    def gateway_service_host(self) -> str:
        return self._docker().container_name("gateway")


def prepare(accelerator: str, plan: Path | None = None, budgets: list[str] | None = None,
            image: str | None = None, reserve: str | None = None) -> Replica:
    """Resolve what a replica runs on ``accelerator`` (cpu, gpu/cuda, rocm), with an optional GPU memory plan.

    Nothing is detected: the cluster's GPUs are not this machine's. A plan therefore needs fractions or its
    ``devices:`` sizes, and (inside a pod GPUs are numbered from 0) devices ``0..n-1``; the Triton pod then
    requests ``n`` GPUs.
    """
    if accelerator not in ACCELERATORS:
        raise DeployError(f"--accelerator must be one of cpu, gpu, rocm, not {accelerator!r}")
    choice = hardware.choice_for(ACCELERATORS[accelerator])
    hw = hardware.Hardware(gpus=(), source="none (rendered for another machine)")
    launch = Launch(choice=choice, hardware=hw)
    replica = Replica(choice.image, launch, image or f"{NAME}:{choice.image}", 0 if choice.accelerator == "cpu" else 1)
    if plan is None and not budgets and reserve is None:
        return replica
    if choice.accelerator == "cpu":
        raise DeployError("a GPU memory plan needs --accelerator gpu or rocm (on CPU it would not be applied)")
    try:
        resolved = memory.validate(memory.load_plan(plan, list(budgets or []), reserve), hw)
    except (memory.PlanError, ValueError) as exc:
        raise DeployError(str(exc)) from None
    own = sorted({b.device for b in resolved.budgets if not b.external})
    if own != list(range(len(own))):
        raise DeployError(f"the plan places our models on devices {own}: inside a pod the GPUs it was given are "
                          f"numbered 0..n-1, so use devices 0..{max(len(own), 1) - 1}")
    triton_args, env, notes = memory.process_knobs(resolved)
    launch.plan = resolved
    launch.rendered = memory.Rendered(memory.PLAN_CONFIG_NAME, [], triton_args, env, {}, resolved, notes=notes)
    replica.gpus = max(len(own), 1)
    # The pod renders the per-model configs from a plan file: the effective one (file + --budget/--reserve).
    replica.plan_text = _plan_yaml(resolved.plan)
    replica.notes = notes
    return replica


def _plan_yaml(plan: memory.MemoryPlan) -> str:
    import yaml

    data: dict[str, Any] = plan.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)


def triton_ports() -> dict[str, int]:
    return dict(TRITON_PORTS)


def gateway_port() -> int:
    return GATEWAY_PORT


def readiness_path(service: str) -> str:
    return PROBES[service]


def termination_grace_s() -> int:
    return EXIT_TIMEOUT_S + GRACE_MARGIN_S
