"""``vlmserve deploy k8s|swarm`` (also ``python -m vlmserve.orchestrator deploy ...``)."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmserve.orchestrator.console import fail, say, settings_from
from vlmserve.orchestrator.deploy import k8s, spec, swarm

app = typer.Typer(help="Deploy beyond one machine: Kubernetes manifests, or N replicas on Docker Swarm.",
                  no_args_is_help=True)

AccelOpt = typer.Option("cpu", "--accelerator", help="cpu, gpu (NVIDIA) or rocm (AMD)")
PlanOpt = typer.Option(None, "--plan", help="GPU memory plan (YAML/JSON); devices 0..n-1 = the pod's GPUs")
BudgetOpt = typer.Option(None, "--budget", help="NAME=0.25 | NAME=6GiB[@DEVICE][:external], repeatable")
ImageOpt = typer.Option(None, "--image", help="Triton image (default vlmserve:<cpu|gpu|rocm>)")


@app.command("k8s")
def deploy_k8s(
    accelerator: str = AccelOpt, plan: Path | None = PlanOpt, budget: list[str] | None = BudgetOpt,
    image: str | None = ImageOpt,
    out: Path = typer.Option(Path("vlmserve-k8s"), "--out", help="folder for this variant (kubectl apply -k)"),
    kustomize: Path | None = typer.Option(None, "--kustomize", help="instead: write the base + cpu/gpu/rocm "
                                          "overlays layout here (what docker/k8s holds)"),
    triton_max: int = typer.Option(k8s.Scaling.triton_max, "--triton-max", help="HPA: most Triton replicas"),
    queue_target_ms: float = typer.Option(k8s.Scaling.queue_target_ms, "--queue-target-ms",
                                          help="HPA: Triton's average queue time per request to scale at"),
    gateway_max: int = typer.Option(k8s.Scaling.gateway_max, "--gateway-max", help="HPA: most gateway replicas"),
) -> None:
    """Render Kubernetes manifests: Triton + gateway Deployments, Services, PDBs, NetworkPolicy, HPAs, and
    optional monitoring (ServiceMonitor, prometheus-adapter rules)."""
    scaling = k8s.Scaling(triton_max=triton_max, queue_target_ms=queue_target_ms, gateway_max=gateway_max)
    if kustomize is not None:
        written = k8s.write_tree(k8s.kustomize_layout(scaling), kustomize)
        print(f"wrote {len(written)} files under {kustomize}: kubectl apply -k {kustomize}/overlays/<cpu|gpu|rocm>")
        return
    try:
        replica = spec.prepare(accelerator, plan, budget, image)
    except spec.DeployError as exc:
        raise fail(exc) from None
    for note in replica.notes:
        say(note)
    written = k8s.write_tree(k8s.bundle(replica, scaling), out)
    print(f"wrote {len(written)} files under {out}: kubectl apply -k {out}")


@app.command("swarm")
def deploy_swarm(
    replicas: int = typer.Option(2, "--replicas", min=1, help="Triton and gateway replicas"),
    out: Path = typer.Option(Path("vlmserve-swarm"), "--out", help="folder for stack.yaml and nginx.conf"),
    repo: Path | None = typer.Option(None, "--repo", help="model repository (default: the set's built one)"),
    model_set: str | None = typer.Option(None, "--set", help="model set whose repository to serve"),
    port: int = typer.Option(8080, "--port", help="host port of the load balancer"),
    project: str = typer.Option("vlmserve-swarm", "--project", help="stack name (labels, names)"),
    image: str = typer.Option("vlmserve:cpu", "--image", help="image of the replicas"),
    lb_image: str = typer.Option(swarm.LB_IMAGE, "--lb-image", help="nginx image (docker/Dockerfile.lb)"),
    build_lb: bool = typer.Option(False, "--build-lb", help="build the nginx image first"),
    up: bool = typer.Option(False, "--up", help="docker stack deploy it (initialises a swarm if needed)"),
    down: bool = typer.Option(False, "--down", help="remove the stack and wait until nothing is left"),
) -> None:
    """N gateway+Triton replicas behind nginx on Docker Swarm (CPU images; dnsrr, no routing mesh needed)."""
    from vlmserve.orchestrator.launchers.docker import DockerUnavailable, docker_client

    try:
        if down:
            removed = swarm.remove(docker_client(), project)
            print("removed:\n  " + "\n  ".join(removed) if removed else f"no stack {project}")
            return
        settings = settings_from(model_set, repo)
        replica = spec.prepare("cpu", image=image)
        stack_file = swarm.write(replica, replicas, settings.repository_path, port, project, out, lb_image)
        print(f"wrote {stack_file} and {out / 'nginx.conf'}")
        if build_lb:
            swarm.build_lb_image(docker_client(), lb_image, log=say)
        if up:
            if not settings.repository_path.is_dir():
                raise swarm.SwarmError(f"model repository {settings.repository_path} is missing: "
                                       "run `vlmserve export` first")
            if swarm.ensure_swarm():
                say("initialised a single-node swarm on this engine (`docker swarm leave --force` undoes it)")
            swarm.deploy(stack_file, project)
            print(f"deployed stack {project}: http://127.0.0.1:{port} (docker stack ps {project})")
    except (swarm.SwarmError, DockerUnavailable) as exc:
        raise fail(exc) from None
