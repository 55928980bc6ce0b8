"""The terminal side shared by the orchestrator's commands (``vlmserve up|down|...`` and ``vlmserve deploy ...``):
one stderr console, its message and error shapes, and settings built from command-line options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from vlmserve.orchestrator.settings import OrchestratorSettings, deprecated_env

console = Console(stderr=True)


def say(message: str) -> None:
    console.print(f"[cyan]vlmserve[/cyan] {escape(message)}", highlight=False)


def fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}", highlight=False)
    return typer.Exit(1)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


def settings_from(model_set: str | None = None, repo: Path | None = None, **overrides: Any) -> OrchestratorSettings:
    """The settings (environment, then these options); warns about deprecated environment names."""
    for message in deprecated_env():
        warn(message)
    values = {k: v for k, v in overrides.items() if v is not None}
    if model_set:
        values["model_set"] = model_set
    if repo:
        values["repository"] = repo
    try:
        return OrchestratorSettings(**values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
