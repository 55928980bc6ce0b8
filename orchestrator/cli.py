"""Orchestrator commands, shared by ``python -m vlmserve.orchestrator`` and the ``vlmserve`` CLI.

Verbs (the old Florence-2 service's docker manager had the same ones): ``up`` (alias ``start``), ``down`` (alias
``stop``),
``restart``, ``status``, ``health``, ``logs``, ``clean``, ``ensure``, plus ``run`` (foreground, supervised),
``hardware``, ``plan``, ``image build`` and ``deploy k8s|swarm``. ``--launcher NAME`` picks what starts the services
from :data:`~vlmserve.orchestrator.launchers.LAUNCHERS` (``process``, the default: local processes; ``docker``:
containers through the Docker Engine API); the commands know a launcher only through the
:class:`~vlmserve.orchestrator.launcher.Launcher` protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmserve.orchestrator import hardware, memory
from vlmserve.orchestrator.console import console, fail, say, settings_from, warn
from vlmserve.orchestrator.deploy.cli import app as deploy_app
from vlmserve.orchestrator.images import IMAGES, ImageBuildError
from vlmserve.orchestrator.launch import Launch, plan_launch
from vlmserve.orchestrator.launcher import Launcher, LaunchError
from vlmserve.orchestrator.launchers import LAUNCHERS
from vlmserve.orchestrator.settings import OrchestratorSettings

app = typer.Typer(help="Start, stop and inspect vlmserve's services (local processes or Docker containers).",
                  no_args_is_help=True)
image_app = typer.Typer(help="Build the vlmserve images (docker/Dockerfile.<image>).", no_args_is_help=True)
app.add_typer(image_app, name="image")
app.add_typer(deploy_app, name="deploy")

NAMES = " or ".join(LAUNCHERS)
SetOpt = typer.Option(None, "--set", help="model set whose repository to serve: tiny, hub or perf")
RepoOpt = typer.Option(None, "--repo", help="model repository path (default: the set's built repository)")
LauncherOpt = typer.Option(None, "--launcher", help=f"what starts the services: {NAMES} "
                           "(default: process, or VLMSERVE_LAUNCHER)")
AnyLauncherOpt = typer.Option(None, "--launcher", help=f"{NAMES} (default: all)")
# The launcher's old name, before "runtime" meant only export's ONNX Runtime/OpenVINO choice: kept for scripts.
DeprecatedOpt = typer.Option(None, "--runtime", hidden=True, help="deprecated: --launcher")
AccelOpt = typer.Option(None, "--accelerator", help="auto (default), cpu, cuda or rocm")
FallbackOpt = typer.Option(None, "--fallback/--no-fallback", help="fall back to CPU when the accelerator is absent")
PlanOpt = typer.Option(None, "--plan", help="GPU memory plan file (YAML/JSON); see docker/gpu-plan.example.yaml")
BudgetOpt = typer.Option(None, "--budget", help="NAME=0.25 | NAME=6GiB[@DEVICE][:external], repeatable; "
                         "overrides the plan file")
ReserveOpt = typer.Option(None, "--reserve", help="per-device reserve for CUDA contexts (fraction or size)")


def launcher_name(launcher: str | None, deprecated: str | None) -> str | None:
    """``--launcher``, or the deprecated ``--runtime`` (with a warning) when only that is given."""
    if deprecated is not None:
        warn("--runtime is deprecated: use --launcher (--runtime now means only export's ONNX Runtime/OpenVINO "
             "choice)")
    return launcher if launcher is not None else deprecated


def launcher(settings: OrchestratorSettings, name: str | None = None, launch: Launch | None = None) -> Launcher:
    """The launcher ``name`` from :data:`LAUNCHERS` (default: the settings' launcher)."""
    name = name or settings.launcher
    factory = LAUNCHERS.get(name)
    if factory is None:
        raise typer.BadParameter(f"unknown launcher {name!r} (--launcher or VLMSERVE_LAUNCHER): one of "
                                 f"{', '.join(LAUNCHERS)}")
    return factory(settings, log=say, launch=launch)


def _launch(settings: OrchestratorSettings, budget: list[str] | None, reserve: str | None, in_image: bool) -> Launch:
    try:
        launch = plan_launch(settings, budget, reserve, in_image=in_image)
    except (hardware.AcceleratorUnavailable, memory.PlanError, ValueError) as exc:
        raise fail(exc) from None
    for warning in launch.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    hw = launch.hardware
    gpus = ", ".join(f"{g.vendor} {g.name}" for g in hw.gpus) or "no GPU"
    say(f"hardware: {gpus} (via {hw.source}); accelerator {launch.choice.accelerator}, "
         f"image {launch.choice.image}")
    return launch


def _planned(settings: OrchestratorSettings, name: str | None, budget: list[str] | None,
             reserve: str | None) -> Launcher:
    """The launcher, with its start planned (fails before anything starts: accelerator, memory plan)."""
    chosen = launcher(settings, name)
    chosen.launch = _launch(settings, budget, reserve, chosen.in_image)
    return chosen


def _settings(model_set, repo, name, accelerator, fallback, plan) -> OrchestratorSettings:
    return settings_from(model_set, repo, launcher=name, accelerator=accelerator, fallback=fallback, gpu_plan=plan)


def _run_args(model_set, repo, accelerator, fallback, plan, budget, reserve) -> list[str]:
    """The same options for a detached supervisor (`run`, started by `up` in the process launcher)."""
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


def _start(verb: Literal["up", "ensure"], model_set, repo, name, accelerator, fallback, plan, budget, reserve,
           deprecated) -> list[str]:
    """``up`` or ``ensure`` on the launcher the options name, with its memory plan; what it started."""
    name = launcher_name(name, deprecated)
    chosen = _planned(_settings(model_set, repo, name, accelerator, fallback, plan), name, budget, reserve)
    run_args = _run_args(model_set, repo, accelerator, fallback, plan, budget, reserve)
    try:
        return chosen.up(run_args) if verb == "up" else chosen.ensure(run_args)
    except LaunchError as exc:
        raise fail(exc) from None


@app.command()
def up(model_set: str | None = SetOpt, repo: Path | None = RepoOpt, name: str | None = LauncherOpt,
       accelerator: str | None = AccelOpt, fallback: bool | None = FallbackOpt, plan: Path | None = PlanOpt,
       budget: list[str] | None = BudgetOpt, reserve: str | None = ReserveOpt,
       deprecated: str | None = DeprecatedOpt) -> None:
    """Start Triton + gateway in the background (supervised) and wait until both are healthy."""
    _start("up", model_set, repo, name, accelerator, fallback, plan, budget, reserve, deprecated)


@app.command("start", help="Alias of `up` (the old Florence-2 service's docker manager's verb).")
def start(model_set: str | None = SetOpt, repo: Path | None = RepoOpt, name: str | None = LauncherOpt,
          accelerator: str | None = AccelOpt, fallback: bool | None = FallbackOpt, plan: Path | None = PlanOpt,
          budget: list[str] | None = BudgetOpt, reserve: str | None = ReserveOpt,
          deprecated: str | None = DeprecatedOpt) -> None:
    up(model_set, repo, name, accelerator, fallback, plan, budget, reserve, deprecated)


@app.command()
def run(model_set: str | None = SetOpt, repo: Path | None = RepoOpt, accelerator: str | None = AccelOpt,
        fallback: bool | None = FallbackOpt, plan: Path | None = PlanOpt, budget: list[str] | None = BudgetOpt,
        reserve: str | None = ReserveOpt,
        name: str | None = typer.Option(None, "--launcher", help=f"{NAMES} (default: process; docker: containers "
                                        "that live only as long as this command)"),
        deprecated: str | None = DeprecatedOpt) -> None:
    """Start Triton + gateway in the foreground, restart them if they crash; Ctrl-C stops both. Whatever ends
    this command, nothing it started outlives it."""
    name = launcher_name(name, deprecated) or "process"  # not VLMSERVE_LAUNCHER: `run` is local unless told
    settings = _settings(model_set, repo, name, accelerator, fallback, plan)
    chosen = _planned(settings, name, budget, reserve)
    try:
        code = chosen.run_foreground()
    except LaunchError as exc:
        raise fail(exc) from None
    raise typer.Exit(code)


def _present(settings: OrchestratorSettings, name: str | None) -> list[Launcher]:
    """Launchers to act on: the named one, or every launcher that is usable here."""
    if name:
        return [launcher(settings, name)]
    return [found for factory in LAUNCHERS.values() if (found := factory(settings, log=say)).available()]


@app.command()
def down(name: str | None = AnyLauncherOpt, deprecated: str | None = DeprecatedOpt) -> None:
    """Stop what `up` started (processes and/or containers + network)."""
    name = launcher_name(name, deprecated)
    settings = settings_from()
    try:
        stopped = [f"{chosen.name} {n}" for chosen in _present(settings, name) for n in chosen.down()]
    except LaunchError as exc:
        raise fail(exc) from None
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command("stop", help="Alias of `down` (the old Florence-2 service's docker manager's verb).")
def stop(name: str | None = AnyLauncherOpt, deprecated: str | None = DeprecatedOpt) -> None:
    down(name, deprecated)


@app.command()
def restart(model_set: str | None = SetOpt, repo: Path | None = RepoOpt, name: str | None = LauncherOpt,
            accelerator: str | None = AccelOpt, fallback: bool | None = FallbackOpt, plan: Path | None = PlanOpt,
            budget: list[str] | None = BudgetOpt, reserve: str | None = ReserveOpt,
            deprecated: str | None = DeprecatedOpt) -> None:
    """`down` then `up`."""
    name = launcher_name(name, deprecated)
    settings = _settings(model_set, repo, name, accelerator, fallback, plan)
    try:
        launcher(settings, name).down()
    except LaunchError as exc:
        raise fail(exc) from None
    chosen = _planned(settings, name, budget, reserve)
    try:
        chosen.up(_run_args(model_set, repo, accelerator, fallback, plan, budget, reserve))
    except LaunchError as exc:
        raise fail(exc) from None


@app.command()
def ensure(model_set: str | None = SetOpt, repo: Path | None = RepoOpt, name: str | None = LauncherOpt,
           accelerator: str | None = AccelOpt, fallback: bool | None = FallbackOpt, plan: Path | None = PlanOpt,
           budget: list[str] | None = BudgetOpt, reserve: str | None = ReserveOpt,
           deprecated: str | None = DeprecatedOpt) -> None:
    """Start only what is not running and healthy (safe to call from cron or a boot script)."""
    started = _start("ensure", model_set, repo, name, accelerator, fallback, plan, budget, reserve, deprecated)
    console.print(f"started: {', '.join(started)}" if started else "already running and healthy")


COLUMNS = ("service", "launcher", "state", "restarts", "health", "ports", "device", "memory", "id", "log")


@app.command()
def status(name: str | None = AnyLauncherOpt, as_json: bool = typer.Option(False, "--json"),
           plan: Path | None = PlanOpt, budget: list[str] | None = BudgetOpt,
           deprecated: str | None = DeprecatedOpt) -> None:
    """Table of services: launcher, state, restarts, health, ports, device, memory; with --plan, GPU budgets
    next to measured use."""
    name = launcher_name(name, deprecated)
    settings = settings_from(gpu_plan=plan)
    try:
        rows = [row for chosen in _present(settings, name) for row in chosen.status()]
    except LaunchError as exc:
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
def health(name: str | None = AnyLauncherOpt, deprecated: str | None = DeprecatedOpt) -> None:
    """The gateway's /health (per-model readiness) and Triton's readiness; exit 1 when not healthy."""
    launcher_name(name, deprecated)  # either launcher serves the same ports: the settings' URLs are asked
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
         name: str | None = AnyLauncherOpt, deprecated: str | None = DeprecatedOpt) -> None:
    """Print (or follow) the services' logs."""
    name = launcher_name(name, deprecated)
    settings = settings_from()
    printed = False
    try:
        for chosen in _present(settings, name):
            if not name and not chosen.active():
                continue
            for line in chosen.logs(service, follow, tail):
                print(line, flush=True)
                printed = True
    except (ValueError, LaunchError) as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        return
    if not printed:
        console.print("no logs: nothing is running")


@app.command()
def clean(name: str | None = AnyLauncherOpt,
          volumes: bool = typer.Option(False, "--volumes", help="also remove the HF cache volume (docker)"),
          deprecated: str | None = DeprecatedOpt) -> None:
    """Stop and remove what vlmserve created: labelled containers and networks, run-directory logs.
    Nothing else (other containers, images, the model repository) is touched."""
    name = launcher_name(name, deprecated)
    settings = settings_from()
    try:
        removed = [item for chosen in _present(settings, name) for item in chosen.clean(volumes)]
    except LaunchError as exc:
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
    from vlmserve.orchestrator.images import build_image
    from vlmserve.orchestrator.launchers.docker import DockerUnavailable, docker_client

    if image not in IMAGES:
        raise typer.BadParameter(f"--image must be one of {', '.join(IMAGES)}")
    settings = settings_from()
    try:
        image_id = build_image(docker_client(), image, tag or f"vlmserve:{image}", settings.cache_dir, base_image,
                               log=say)
    except (ImageBuildError, DockerUnavailable) as exc:
        raise fail(exc) from None
    print(image_id)
