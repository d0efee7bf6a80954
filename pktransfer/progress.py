"""Rich progress bars and log lines that ``--quiet`` silences.

When nobody watches a terminal (a log file, a job array, CI) a bar would print nothing until it ends, so a
plain line is printed instead at a steady interval (``$PKT_PROGRESS_INTERVAL`` seconds, default 30) and once at
the end: what, done/total, rate, eta and the task's fields (loss, ...).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True)

    def log(self, message: str) -> None:
        if not self.quiet:
            # soft_wrap: a log file gets one line per message, not lines cut at 80 columns
            # escaped: a message is text, so a label such as "seeking[lr=0.0001]" is printed, not read as markup
            self.console.print(f"[dim]pkt[/dim] {escape(message)}", highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """A warning that must be seen: printed even when quiet."""
        self.console.print(f"[bold yellow]pkt warning[/bold yellow] {escape(message)}", highlight=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: int | None, done: int = 0) -> Iterator[Callable[..., None]]:
        """Yield ``advance(n=1, **fields)``; shows a bar unless quiet. ``done``: units finished before this process (a
        resumed run): they count toward the total, not toward the rate or the time left."""
        if self.quiet:
            yield lambda n=1, **kw: None
            return
        if not self.console.is_terminal:
            with self._plain_task(description, total, done) as advance:
                yield advance
            return
        columns = [
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", markup=False),
        ]
        with RichProgress(*columns, console=self.console, transient=False) as bar:
            tid = bar.add_task(description, total=total, completed=done, info="")

            def advance(n: int = 1, **fields: object) -> None:
                info = " ".join(f"{k}={v}" for k, v in fields.items())
                bar.update(tid, advance=n, info=info)

            yield advance

    @contextmanager
    def _plain_task(self, description: str, total: int | None, resumed: int = 0) -> Iterator[Callable[..., None]]:
        interval = float(os.environ.get("PKT_PROGRESS_INTERVAL", "30"))
        start = last = time.monotonic()
        state: dict[str, object] = {"done": resumed, "info": ""}

        def line() -> str:
            done = int(state["done"])  # type: ignore[call-overload]
            elapsed = time.monotonic() - start
            rate = (done - resumed) / elapsed if elapsed > 0 else 0.0
            eta = f", eta {(total - done) / rate:.0f} s" if total and rate > 0 and done < total else ""
            of = f"/{total}" if total else ""
            since = f" (resumed at {resumed})" if resumed else ""
            info = f", {state['info']}" if state["info"] else ""
            return f"{description}: {done}{of}{since} in {elapsed:.0f} s ({rate:.2f}/s{eta}){info}"

        def advance(n: int = 1, **fields: object) -> None:
            nonlocal last
            state["done"] = int(state["done"]) + n  # type: ignore[call-overload]
            if fields:
                state["info"] = " ".join(f"{k}={v}" for k, v in fields.items())
            now = time.monotonic()
            if now - last >= interval:
                last = now
                self.log(line())

        yield advance
        self.log(line())
