"""Progress display shared by every long stage (rich progress bars on stderr).

Bars are drawn only on a terminal; elsewhere (CI logs, files) a plain line is printed every
`log_every_s` seconds so that long runs still show they are alive.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    def __init__(self, total: int | None, description: str, log_every_s: float = 10.0, enabled: bool = True):
        self.total, self.description = total, description
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.interactive = enabled and self.console.is_terminal
        self.log_every_s = log_every_s
        self._last_log = time.monotonic()
        self.completed = 0
        self.fields = ""
        self._progress: Progress | None = None
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task(description, total=total, info="")
            self._progress.start()

    def update(self, completed: int, info: str = "") -> None:
        self.completed, self.fields = completed, info
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, info=info)
        elif self.enabled and time.monotonic() - self._last_log >= self.log_every_s:
            self._last_log = time.monotonic()
            self._print_line()

    def _print_line(self) -> None:
        total = f"/{self.total}" if self.total is not None else ""
        print(f"[{self.description}] {self.completed}{total} {self.fields}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        elif self.enabled:
            self._print_line()

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
