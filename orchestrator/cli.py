"""Orchestrator commands, shared by ``python -m vlmserve.orchestrator`` and the ``vlmserve`` CLI.

Verbs (the old Florence-2 service's docker manager had the same ones): ``up`` (alias ``start``), ``down`` (alias
``stop``),
``restart``, ``status``, ``health``, ``logs``, ``clean``, ``ensure``, plus ``run`` (foreground, supervised),
``hardware``, ``plan``, ``image build`` and ``deploy k8s|swarm``. ``--runtime process`` (default) runs local processes;
``--runtime docker`` runs containers through the Docker Engine API.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmserve.orchestrator import hardware, memory
from vlmserve.orchestrator.console import console, fail, say, settings_from
from vlmserve.orchestrator.deploy.cli import app as deploy_app
from vlmserve.orchestrator.docker_runtime import DockerRuntime, DockerUnavailable
from vlmserve.orchestrator.images import IMAGES, ImageBuildError
from vlmserve.orchestrator.launch import Launch, plan_launch
from vlmserve.orchestrator.process import ProcessRuntime, StartupError
from vlmserve.orchestrator.settings import OrchestratorSettings
from vlmserve.orchestrator.triton import TritonNotFound

app = typer.Typer(help="Start, stop and inspect vlmserve's services (local processes or Docker containers).",
                  no_args_is_help=True)
image_app = typer.Typer(help="Build the vlmserve images (docker/Dockerfile.<image>).", no_args_is_help=True)
app.add_typer(image_app, name="image")
app.add_typer(deploy_app, name="deploy")

SetOpt = typer.Option(None, "--set", help="model set whose repository to serve: tiny, hub or perf")
RepoOpt = typer.Option(None, "--repo", help="model repository path (default: the set's built repository)")
RuntimeOpt = typer.Option(None, "--runtime", help="process (default, VLMSERVE_RUNTIME) or docker")
AnyRuntimeOpt = typer.Option(None, "--runtime", help="process or docker (default: both)")
AccelOpt = typer.Option(None, "--accelerator", help="auto (default), cpu, cuda or rocm")
FallbackOpt = typer.Option(None, "--fallback/--no-fallback", help="fall back to CPU when the accelerator is absent")
PlanOpt = typer.Option(None, "--plan", help="GPU memory plan file (YAML/JSON); see docker/gpu-plan.example.yaml")
BudgetOpt = typer.Option(None, "--budget", help="NAME=0.25 | NAME=6GiB[@DEVICE][:external], repeatable; "
                         "overrides the plan file")
ReserveOpt = typer.Option(None, "--reserve", help="per-device reserve for CUDA contexts (fraction or size)")
RUNTIMES = ("process", "docker")


def runtime(settings: OrchestratorSettings, name: str | None = None, launch: Launch | None = None):
    """The runtime object for ``name`` (default: the settings' runtime)."""
    name = name or settings.runtime
    if name not in RUNTIMES:
        raise typer.BadParameter(f"--runtime must be one of {', '.join(RUNTIMES)}, not {name!r}")
    cls = DockerRuntime if name == "docker" else ProcessRuntime
    return cls(settings, log=say, launch=launch)


def _launch(settings: OrchestratorSettings, budget: list[str] | None, reserve: str | None,
            runtime_name: str) -> Launch:
    try:
        launch = plan_launch(settings, budget, reserve, runtime_name)
    except (hardware.AcceleratorUnavailable, memory.PlanError, ValueError) as exc:
        raise fail(exc) from None
    for warning in launch.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    hw = launch.hardware
    gpus = ", ".join(f"{g.vendor} {g.name}" for g in hw.gpus) or "no GPU"
    say(f"hardware: {gpus} (via {hw.source}); accelerator {launch.choice.accelerator}, "
         f"image {launch.choice.image}")
    return launch


def _settings(model_set, repo, runtime_name, accelerator, fallback, plan) -> OrchestratorSettings:
    return settings_from(model_set, repo, runtime=runtime_name, accelerator=accelerator, fallback=fallback,
                         gpu_plan=plan)


def _child_args(model_set, repo, accelerator, fallback, plan, budget, reserve) -> list[str]:
    """The same options for the detached supervisor (`up` in the process runtime)."""
    args: list[str] = []
    for flag, value in (("--set", model_set), ("--repo", repo), ("--accelerator", accelerator),
                        ("--plan", plan), ("--reserve", reserve)):
        if value is not None:
            args += [flag, str(value)]
    if fallback is not None:
        args.append("--fallback" if fallback else "--no-fallback")
    for b in budget or []:
        args += ["--budget", b]
    return args


def _up(settings: OrchestratorSettings, child_args: list[str], budget, reserve) -> None:
    name = settings.runtime
    try:
        if name == "docker":
            launch = _launch(settings, budget, reserve, "docker")
            docker_rt = runtime(settings, name, launch)
            docker_rt.up()
        else:
            _launch(settings, budget, reserve, "process")  # fail fast, before detaching
            runtime(settings, name).up(child_args, dict(os.environ))
    except (StartupError, TritonNotFound, DockerUnavailable) as exc:
        raise fail(exc) from None


@app.command()
def up(model_set: str | None = SetOpt, repo: Path | None = RepoOpt, runtime_name: str | None = RuntimeOpt,
       accelerator: str | None = AccelOpt, fallback: bool | None = FallbackOpt, plan: Path | None = PlanOpt,
       budget: list[str] | None = BudgetOpt, reserve: str | None = ReserveOpt) -> None:
    """Start Triton + gateway in the background (supervised) and wait until both are healthy."""
    settings = _settings(model_set, repo, runtime_name, accelerator, fallback, plan)
    _up(settings, _child_args(model_set, repo, accelerator, fallback, plan, budget, reserve), budget, reserve)


@app.command("start", help="Alias of `up` (the old Florence-2 service's docker manager's verb).")
def start(model_set: str | None = SetOpt, repo: Path | None = RepoOpt, runtime_name: str | None = RuntimeOpt,
          accelerator: str | None = AccelOpt, fallback: bool | None = FallbackOpt, plan: Path | None = PlanOpt,
          budget: list[str] | None = BudgetOpt, reserve: str | None = ReserveOpt) -> None:
    up(model_set, repo, runtime_name, accelerator, fallback, plan, budget, reserve)


@app.command()
def run(model_set: str | None = SetOpt, repo: Path | None = RepoOpt, accelerator: str | None = AccelOpt,
        fallback: bool | None = FallbackOpt, plan: Path | None = PlanOpt, budget: list[str] | None = BudgetOpt,
        reserve: str | None = ReserveOpt,
        runtime_name: str = typer.Option("process", "--runtime", help="process (default) or docker (containers "
                                         "that live only as long as this command)")) -> None:
    """Start Triton + gateway in the foreground, restart them if they crash; Ctrl-C stops both. Whatever ends
    this command, nothing it started outlives it."""
    if runtime_name not in RUNTIMES:
        raise typer.BadParameter(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime_name!r}")
    settings = _settings(model_set, repo, runtime_name, accelerator, fallback, plan)
    launch = _launch(settings, budget, reserve, runtime_name)
    try:
        code = runtime(settings, runtime_name, launch).run_foreground()
    except (StartupError, TritonNotFound, DockerUnavailable) as exc:
        raise fail(exc) from None
    raise typer.Exit(code)


def _present(settings: OrchestratorSettings, runtime_name: str | None) -> list[Any]:
    """Runtimes to act on: the named one, or every runtime that is usable here."""
    if runtime_name:
        return [runtime(settings, runtime_name)]
    found: list[Any] = [ProcessRuntime(settings, log=say)]
    docker_rt = DockerRuntime(settings, log=say)
    try:
        docker_rt.client  # noqa: B018 - probe for an engine; without one there is nothing of ours in Docker
        found.append(docker_rt)
    except DockerUnavailable:
        pass
    return found


@app.command()
def down(runtime_name: str | None = AnyRuntimeOpt) -> None:
    """Stop what `up` started (processes and/or containers + network)."""
    settings = settings_from()
    try:
        stopped = [f"{rt.name} {n}" for rt in _present(settings, runtime_name) for n in rt.down()]
    except DockerUnavailable as exc:
        raise fail(exc) from None
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command("stop", help="Alias of `down` (the old Florence-2 service's docker manager's verb).")
def stop(runtime_name: str | None = AnyRuntimeOpt) -> None:
    down(runtime_name)


@app.command()
def restart(model_set: str | None = SetOpt, repo: Path | None = RepoOpt, runtime_name: str | None = RuntimeOpt,
            accelerator: str | None = AccelOpt, fallback: bool | None = FallbackOpt, plan: Path | None = PlanOpt,
            budget: list[str] | None = BudgetOpt, reserve: str | None = ReserveOpt) -> None:
    """`down` then `up`."""
    settings = _settings(model_set, repo, runtime_name, accelerator, fallback, plan)
    try:
        runtime(settings).down()
    except DockerUnavailable as exc:
        raise fail(exc) from None
    _up(settings, _child_args(model_set, repo, accelerator, fallback, plan, budget, reserve), budget, reserve)


@app.command()
def ensure(model_set: str | None = SetOpt, repo: Path | None = RepoOpt, runtime_name: str | None = RuntimeOpt,
           accelerator: str | None = AccelOpt, fallback: bool | None = FallbackOpt, plan: Path | None = PlanOpt,
           budget: list[str] | None = BudgetOpt, reserve: str | None = ReserveOpt) -> None:
    """Start only what is not running and healthy (safe to call from cron or a boot script)."""
    settings = _settings(model_set, repo, runtime_name, accelerator, fallback, plan)
    rt = runtime(settings)
    try:
        if isinstance(rt, DockerRuntime):
            rt.launch = _launch(settings, budget, reserve, "docker")
            started = rt.ensure()
        else:
            rows = rt.status()
            if rt.supervisor() and rows and all(r["health"] == "healthy" for r in rows):
                started = []
            else:
                rt.down()
                _up(settings, _child_args(model_set, repo, accelerator, fallback, plan, budget, reserve),
                    budget, reserve)
                started = ["triton", "gateway"]
    except (StartupError, TritonNotFound, DockerUnavailable) as exc:
        raise fail(exc) from None
    console.print(f"started: {', '.join(started)}" if started else "already running and healthy")


COLUMNS = ("service", "runtime", "state", "restarts", "health", "ports", "device", "memory", "id", "log")


@app.command()
def status(runtime_name: str | None = AnyRuntimeOpt, as_json: bool = typer.Option(False, "--json"),
           plan: Path | None = PlanOpt, budget: list[str] | None = BudgetOpt) -> None:
    """Table of services: runtime, state, restarts, health, ports, device, memory; with --plan, GPU budgets
    next to measured use."""
    settings = settings_from(gpu_plan=plan)
    try:
        rows = [row for rt in _present(settings, runtime_name) for row in rt.status()]
    except DockerUnavailable as exc:
        raise fail(exc) from None
    budgets = _budget_rows(settings, budget) if (plan or budget) else []
    runtimes = runtime_rows(settings.repository_path)
    if as_json:
        print(json.dumps({"services": rows, "gpu_budgets": budgets, "runtimes": runtimes}, indent=2, default=str))
    else:
        table = Table(*COLUMNS, title="vlmserve services")
        for r in rows:
            table.add_row(*(str(r.get(c, "-")) for c in COLUMNS))
        Console(width=200).print(table)
        if budgets:
            plan_table = Table(*budgets[0].keys(), title="GPU memory plan vs measured")
            for b in budgets:
                plan_table.add_row(*(str(v) for v in b.values()))
            Console(width=200).print(plan_table)
        if runtimes:
            runtime_table = Table(*runtimes[0].keys(), title=f"runtimes chosen at export ({settings.repository_path})")
            for r in runtimes:
                runtime_table.add_row(*(str(v) for v in r.values()))
            Console(width=200).print(runtime_table)
    if not rows:
        console.print("nothing is running")
        raise typer.Exit(3)


def runtime_rows(repository: Path) -> list[dict[str, Any]]:
    """What export chose per model on this host (``runtime_choice.json`` / ``decoder_choice.json``)."""
    rows = []
    for path in sorted([*repository.glob("*/runtime_choice.json"), *repository.glob("*/decoder_choice.json")]):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        candidates = report.get("candidates", [])
        chosen: dict[str, Any] = next((c for c in candidates if c.get("precision") == report.get("precision")
                                       and c.get("runtime", report.get("runtime")) == report.get("runtime")), {})
        rows.append({
            "model": path.parent.name,
            "part": "decoder" if path.name.startswith("decoder") else "encoder",
            "runtime": report.get("runtime", "torch"),
            "precision": report.get("precision"),
            "min cosine": f"{chosen.get('min_cosine', report.get('min_cosine', 0)):.5f}",
            "timed": ", ".join(f"{c.get('runtime', 'torch')}/{c['precision']}" for c in report.get("candidates", [])),
            "host": " ".join(report.get("host", {}).get("isa", [])),
        })
    return rows


PLAN_COLUMNS = ("service", "device", "fraction", "budget", "external", "enforced by")


def _budget_rows(settings: OrchestratorSettings, budget: list[str] | None) -> list[dict[str, Any]]:
    """The plan's budgets next to what the device reports as used (all processes: NVML cannot attribute
    memory to our models, only to processes)."""
    hw = hardware.detect()
    try:
        resolved = memory.validate(memory.load_plan(settings.gpu_plan, list(budget or []), None), hw)
    except (memory.PlanError, ValueError) as exc:
        raise fail(exc) from None
    used = {g.index: g.memory_used_bytes for g in hw.gpus}
    rows = []
    for row in resolved.rows():
        device_used = used.get(row.device)
        rows.append({**dict(zip(PLAN_COLUMNS, row.cells(), strict=True)),
                     "device used": memory.human_bytes(device_used) if device_used is not None else "no GPU visible"})
    return rows


@app.command()
def health(runtime_name: str | None = AnyRuntimeOpt) -> None:
    """The gateway's /health (per-model readiness) and Triton's readiness; exit 1 when not healthy."""
    settings = settings_from()
    report: dict[str, Any] = {}
    try:
        report["triton_ready"] = httpx.get(f"{settings.triton_http_url}/v2/health/ready", timeout=5).status_code \
            == 200
    except httpx.HTTPError as exc:
        report["triton_ready"] = False
        report["triton_error"] = str(exc)
    try:
        r = httpx.get(f"{settings.gateway_url}/health", timeout=10)
        report["gateway_status_code"] = r.status_code
        report["gateway"] = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        report["gateway_error"] = str(exc)
    print(json.dumps(report, indent=2))
    healthy = report["triton_ready"] and report.get("gateway_status_code") == 200
    raise typer.Exit(0 if healthy else 1)


@app.command()
def logs(service: str | None = typer.Argument(None, help="triton, gateway (or supervisor); default: all"),
         follow: bool = typer.Option(False, "-f", "--follow", help="keep printing new lines"),
         tail: int | None = typer.Option(None, "--tail", help="only the last N lines"),
         runtime_name: str | None = AnyRuntimeOpt) -> None:
    """Print (or follow) the services' logs."""
    settings = settings_from()
    printed = False
    try:
        for rt in _present(settings, runtime_name):
            if rt.name == "docker" and not rt.containers():
                continue
            if rt.name == "process" and not rt.load() and not runtime_name:
                continue
            lines = rt.logs(service, follow, tail) if rt.name == "process" else rt.logs(service, follow, tail or "all")
            for line in lines:
                print(line, flush=True)
                printed = True
    except ValueError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        return
    if not printed:
        console.print("no logs: nothing is running")


@app.command()
def clean(runtime_name: str | None = AnyRuntimeOpt,
          volumes: bool = typer.Option(False, "--volumes", help="also remove the HF cache volume (docker)")) -> None:
    """Stop and remove what vlmserve created: labelled containers and networks, run-directory logs.
    Nothing else (other containers, images, the model repository) is touched."""
    settings = settings_from()
    try:
        removed = []
        for rt in _present(settings, runtime_name):
            removed += rt.clean(volumes) if rt.name == "docker" else rt.clean()
    except DockerUnavailable as exc:
        raise fail(exc) from None
    console.print("removed:\n  " + "\n  ".join(removed) if removed else "nothing to clean")


@app.command("hardware")
def hardware_cmd(accelerator: str | None = AccelOpt, fallback: bool | None = FallbackOpt) -> None:
    """What accelerators are here, and which image/flavour `up` would choose."""
    hw = hardware.detect()
    table = Table("index", "vendor", "name", "memory total", "memory used", title=f"GPUs (via {hw.source})")
    for g in hw.gpus:
        table.add_row(str(g.index), g.vendor, g.name, memory.human_bytes(g.memory_total_bytes),
                      memory.human_bytes(g.memory_used_bytes) if g.memory_used_bytes is not None else "-")
    Console().print(table if hw.gpus else "no GPU detected")
    for note in hw.notes:
        console.print(f"[dim]{note}[/dim]", highlight=False)
    settings = settings_from(accelerator=accelerator, fallback=fallback)
    try:
        choice = hardware.choose(settings.accelerator, hw, settings.fallback)
    except hardware.AcceleratorUnavailable as exc:
        raise fail(exc) from None
    for w in choice.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    print(f"accelerator: {choice.accelerator}  image: vlmserve:{choice.image}  "
          f"model config: {choice.model_config_name or 'config.pbtxt (native)'}  instances: {choice.instance_kind}")


@app.command("plan")
def plan_cmd(plan: Path | None = PlanOpt, budget: list[str] | None = BudgetOpt, reserve: str | None = ReserveOpt,
             repo: Path | None = RepoOpt, model_set: str | None = SetOpt,
             render: bool = typer.Option(False, "--render", help="also write configs/vlmserve-plan.pbtxt files"),
             base_config: str = typer.Option("embedded", "--base-config", help="config flavour the plan starts "
                                             "from: embedded (Python backend) or native (config.pbtxt)")) -> None:
    """Validate a GPU memory plan and show what it renders into (Triton flags, env, per-model knobs)."""
    settings = settings_from(model_set, repo)
    hw = hardware.detect()
    try:
        resolved = memory.validate(memory.load_plan(plan, list(budget or []), reserve), hw)
        repo_here = bool(memory.model_dirs(settings.repository_path))
        # A dry run shows which knob enforces each budget; without a repository only the budgets can be shown.
        rendered = memory.render(resolved, settings.repository_path, None if base_config == "native" else base_config,
                                 write=render) if repo_here or render else None
        table = Table(*PLAN_COLUMNS, title="GPU memory plan")
        for row in (rendered or resolved).rows():
            table.add_row(*row.cells())
        Console(width=200).print(table)
        for note in (rendered or resolved).notes:
            console.print(f"[dim]{escape(note)}[/dim]")
        if rendered is None:
            console.print(f"[dim]no model repository at {settings.repository_path}: pass --repo or --set to see "
                          "the per-model knobs[/dim]")
            return
        print(f"tritonserver --model-config-name={rendered.config_name} {' '.join(rendered.triton_args)}")
        for k, v in rendered.env.items():
            print(f"export {k}={v}")
        for name, hint in rendered.external_hints.items():
            print(f"{name}: {hint}")
        if render:
            print(f"wrote {len(rendered.files)} configs under {settings.repository_path}")
        else:
            print(f"dry run: --render writes {len(rendered.files)} configs under {settings.repository_path}")
    except (memory.PlanError, ValueError) as exc:
        raise fail(exc) from None


@image_app.command("build")
def image_build(image: str = typer.Option("cpu", "--image", help=f"one of {', '.join(IMAGES)}"),
                tag: str | None = typer.Option(None, "--tag", help="default vlmserve:<image>"),
                base_image: str = typer.Option("debian:bookworm-slim", "--base-image", help="cpu image base")) -> None:
    """Build docker/Dockerfile.<image> from a local wheelhouse (offline inside the build)."""
    from vlmserve.orchestrator.docker_runtime import docker_client
    from vlmserve.orchestrator.images import build_image

    if image not in IMAGES:
        raise typer.BadParameter(f"--image must be one of {', '.join(IMAGES)}")
    settings = settings_from()
    try:
        image_id = build_image(docker_client(), image, tag or f"vlmserve:{image}", settings.cache_dir, base_image,
                               log=say)
    except (ImageBuildError, DockerUnavailable) as exc:
        raise fail(exc) from None
    print(image_id)
