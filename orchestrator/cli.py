"""Orchestrator commands, shared by ``python -m orchestrator`` and the ``vlmserve`` CLI."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.process import ProcessRuntime, StartupError
from orchestrator.settings import OrchestratorSettings
from orchestrator.triton import TritonNotFound

console = Console(stderr=True)
app = typer.Typer(help="Start, stop and inspect vlmserve's services (process runtime).", no_args_is_help=True)

SetOpt = typer.Option(None, "--set", help="model set whose repository to serve: tiny or hub")
RepoOpt = typer.Option(None, "--repo", help="model repository path (default: the set's built repository)")


def settings_from(model_set: str | None = None, repo: Path | None = None, **overrides) -> OrchestratorSettings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if model_set:
        values["model_set"] = model_set
    if repo:
        values["repository"] = repo
    return OrchestratorSettings(**values)


def runtime(settings: OrchestratorSettings) -> ProcessRuntime:
    return ProcessRuntime(settings, log=lambda m: console.print(f"[cyan]vlmserve[/cyan] {m}"))


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)


@app.command()
def start(model_set: str | None = SetOpt, repo: Path | None = RepoOpt) -> None:
    """Start Triton + gateway in the background and wait until both are ready."""
    try:
        runtime(settings_from(model_set, repo)).start()
    except (StartupError, TritonNotFound) as exc:
        raise _fail(exc) from None


@app.command()
def run(model_set: str | None = SetOpt, repo: Path | None = RepoOpt) -> None:
    """Start Triton + gateway in the foreground; Ctrl-C stops both."""
    try:
        code = runtime(settings_from(model_set, repo)).run_foreground()
    except (StartupError, TritonNotFound) as exc:
        raise _fail(exc) from None
    raise typer.Exit(code)


@app.command()
def stop() -> None:
    """Stop what `start` started."""
    stopped = runtime(settings_from()).stop()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status() -> None:
    """Show the services, their state and health."""
    rows = runtime(settings_from()).status()
    if not rows:
        console.print("nothing is running")
        raise typer.Exit(3)
    table = Table("service", "runtime", "pid", "state", "health", "url", "log")
    for r in rows:
        table.add_row(r["service"], r["runtime"], str(r["pid"]), r["state"], r["health"], r["url"], r["log"])
    Console().print(table)
