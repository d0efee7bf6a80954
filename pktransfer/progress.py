"""Rich progress bars and log lines that ``--quiet`` silences."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]pkt[/dim] {message}", highlight=False)

    def warn(self, message: str) -> None:
        """A warning that must be seen: printed even when quiet."""
        self.console.print(f"[bold yellow]pkt warning[/bold yellow] {message}", highlight=False)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """Yield ``advance(n=1, **fields)``; shows a bar unless quiet."""
        if self.quiet:
            yield lambda n=1, **kw: None
            return
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with RichProgress(*columns, console=self.console, transient=False) as bar:
            tid = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, **fields: object) -> None:
                info = " ".join(f"{k}={v}" for k, v in fields.items())
                bar.update(tid, advance=n, info=info)

            yield advance
