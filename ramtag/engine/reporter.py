"""Progress on stderr: a rich bar on a terminal, plain periodic log lines otherwise, nothing with --quiet."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int | None, description: str, quiet: bool = False, interval: float = 10.0):
        self.total = total
        self.done = 0
        self.errors = 0
        self.quiet = quiet
        self.interval = interval
        self.started = time.perf_counter()
        self._last_log = self.started
        self._bar = None
        if not quiet and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} img/s"),
                TextColumn("errors {task.fields[errors]}"),
                TimeRemainingColumn(),
                transient=False,
                redirect_stdout=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, rate=0.0, errors=0)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, images: int, errors: int = 0) -> None:
        self.done += images
        self.errors += errors
        if self._bar is not None:
            self._bar.update(self._task, advance=images, rate=self.rate, errors=self.errors)
            return
        now = time.perf_counter()
        if not self.quiet and now - self._last_log >= self.interval:
            self._last_log = now
            total = f"/{self.total}" if self.total else ""
            print(
                f"ramtag: {self.done}{total} images, {self.rate:.1f} img/s, {self.errors} errors",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        elif not self.quiet:
            print(message, file=sys.stderr, flush=True)
