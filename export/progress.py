"""Terminal progress for long export steps (rich spinner + elapsed time per step)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console


@dataclass
class Step:
    detail: str = ""


class Progress:
    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    @contextmanager
    def step(self, message: str) -> Iterator[Step]:
        step = Step()
        start = time.monotonic()
        if self.quiet:
            yield step
            return
        with self.console.status(f"{message} ..."):
            try:
                yield step
            except BaseException:
                self.console.print(f"[red]✗[/red] {message} ({time.monotonic() - start:.1f}s)")
                raise
        extra = f" — {step.detail}" if step.detail else ""
        self.console.print(f"[green]✓[/green] {message} ({time.monotonic() - start:.1f}s){extra}")
