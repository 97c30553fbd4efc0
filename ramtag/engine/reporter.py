"""Progress and messages on stderr, the one display that `tag`, `train` and `eval` share.

On a terminal each task is a line of a rich bar, with messages printed above it. Otherwise there is no bar:
messages are written as given and a task that has a plain line (tagging's images and rate) prints it every
:data:`PLAIN_EVERY_S` seconds. With ``quiet`` nothing is written. Stdout is never touched: it carries data
(``tag -o -``, ``eval --json -``).

Training's files (train.log, metrics.jsonl) are its own business, in :mod:`ramtag.engine.train.log`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

PLAIN_EVERY_S = 10.0
"""Seconds between two plain progress lines when stderr is not a terminal."""


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal: the one place that decides between a bar and plain lines."""
    return sys.stderr.isatty()


class Reporter:
    """One run's progress display and messages on stderr.

    ``bar`` forces the bar on (or off) whatever stderr is; ``fields`` are rich column templates shown between
    the count and the time left (``"{task.fields[rate]:.1f} img/s"``); ``elapsed`` adds the time spent;
    ``transient`` clears the bar when it closes.
    """

    def __init__(
        self,
        *,
        quiet: bool = False,
        bar: bool | None = None,
        fields: Sequence[str] = (),
        elapsed: bool = False,
        transient: bool = False,
    ) -> None:
        self.quiet = quiet
        self.terminal = stderr_is_terminal()
        self.has_bar = not quiet and (self.terminal if bar is None else bar)
        """Whether progress shows as a bar; when not, a caller's own progress lines are plain messages."""
        self._fields, self._elapsed, self._transient = tuple(fields), elapsed, transient
        self._console: Any = None
        self._bar: Any = None
        self._last_line = time.perf_counter()

    def task(self, description: str, total: int | None, completed: int = 0, **fields: Any) -> Any:
        """A new line of the bar (``fields`` give the templates' first values); None when no bar shows."""
        if not self.has_bar:
            return None
        if self._bar is None:
            self._bar = self._new_bar()
            self._bar.start()
        return self._bar.add_task(description, total=total, completed=completed, **fields)

    def update(
        self,
        task: Any,
        *,
        completed: int | None = None,
        advance: int | None = None,
        line: Callable[[], str] | None = None,
        **fields: Any,
    ) -> None:
        """Move ``task`` on the bar; without a bar, print ``line()`` if :data:`PLAIN_EVERY_S` have passed."""
        if self._bar is not None and task is not None:
            self._bar.update(task, completed=completed, advance=advance, **fields)
            return
        if line is None or self.quiet or self.has_bar:
            return
        now = time.perf_counter()
        if now - self._last_line >= PLAIN_EVERY_S:
            self._last_line = now
            print(line(), file=sys.stderr, flush=True)

    def log(self, message: str, style: str | None = None) -> None:
        """A message line: above the bar, styled, on a terminal; as given otherwise; nothing when quiet."""
        if self.quiet:
            return
        if self.terminal or self._bar is not None:
            # soft_wrap: a long path stays whole, to copy; emoji off: ":cat:" in a label stays text
            self.console.print(message, style=style, markup=False, highlight=False, emoji=False, soft_wrap=True)
        else:
            print(message, file=sys.stderr, flush=True)

    @property
    def console(self) -> Any:
        """The rich console of stderr that the bar draws on."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, force_terminal=self.terminal, highlight=False)
        return self._console

    def close(self) -> None:
        """Stop the bar (it stays on screen unless transient); messages can still follow."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _new_bar(self) -> Any:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        columns += [TextColumn(template) for template in self._fields]
        columns += [TimeElapsedColumn()] if self._elapsed else []
        columns.append(TimeRemainingColumn())
        # redirect_stdout off: stdout carries data, which must not be drawn on the terminal's stderr
        return Progress(
            *columns, console=self.console, transient=self._transient, redirect_stdout=False, redirect_stderr=True
        )


class ImageProgress:
    """Tagging's progress: images done of ``total``, their rate and errors, on a :class:`Reporter`; without a
    bar a line ``ramtag: 40/100 images, 12.0 img/s, 1 errors`` every :data:`PLAIN_EVERY_S` seconds."""

    def __init__(self, total: int | None, description: str, quiet: bool = False):
        self.total = total
        self.done = 0
        self.errors = 0
        self.started = time.perf_counter()
        self.reporter = Reporter(quiet=quiet, fields=("{task.fields[rate]:.1f} img/s", "errors {task.fields[errors]}"))
        self._task = self.reporter.task(description, total, rate=0.0, errors=0)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, images: int, errors: int = 0) -> None:
        self.done += images
        self.errors += errors
        self.reporter.update(self._task, advance=images, line=self._plain_line, rate=self.rate, errors=self.errors)

    def _plain_line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        return f"ramtag: {self.done}{total} images, {self.rate:.1f} img/s, {self.errors} errors"

    def log(self, message: str) -> None:
        self.reporter.log(message)

    def close(self) -> None:
        self.reporter.close()
