"""What every `ramtag tag` driver says and how it ends: one process or torchrun (:mod:`ramtag.engine.tag`) and
Ray (:mod:`ramtag.engine.ray_run`) share the error-row line, the summary line and the exit status, so that a
run reads and ends the same wherever it ran.

The exit status reports the final table: error rows of this run, or of an earlier one that a ``--resume``
kept, and sidecars that could not be written, each end the run with :class:`~ramtag.errors.PartialFailure`
after the output is complete.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ramtag.engine.output import FinalTable
from ramtag.engine.sidecars import describe_counts
from ramtag.errors import PartialFailure
from ramtag.messages import one_line


@dataclass
class TagSummary:
    tagged: int
    failed: int
    seconds: float
    output: str | None
    skipped_done: int = 0
    sidecars: dict = field(default_factory=dict)
    """What happened to the sidecars: written, appended, kept, failed (empty without --sidecars)."""

    @property
    def images_per_second(self) -> float:
        return (self.tagged + self.failed) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RunTally:
    """What this run's rows came to (every rank's, summed)."""

    tagged: int = 0
    failed: int = 0
    first_failure: str | None = None
    """``source: error`` of the first error row (named when every input fails: usually one wrong folder)."""
    sidecars: Counter | None = None
    """The sidecars' outcomes; None without --sidecars."""
    first_sidecar_failure: str | None = None


def stderr_log(quiet: bool) -> Callable[[str], None]:
    """Messages go to stderr (the table may be on stdout); ``--quiet`` drops them."""
    if quiet:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def error_row_line(key: str, source: str, error: str) -> str:
    """The stderr line of one error row, kept to one line (a key may hold a newline)."""
    # a relative path names its file only with where it was looked for
    where = f" ({source})" if source != key and error.startswith("cannot read:") else ""
    return one_line(f"ramtag: {key}: {error}{where}")


def conclude(
    tally: RunTally,
    final: FinalTable,
    seconds: float,
    skipped_done: int,
    *,
    quiet: bool,
    log: Callable[[str], None],
    where_ran: str = "",
    notes: str = "",
) -> TagSummary:
    """The summary (through ``log``: pass a silent one on ranks other than 0) and the exit status.

    ``where_ran`` follows the rate (`` on Ray``); ``notes`` follow the counts (``, 2 retried row(s) dropped``)."""
    counts = tally.sidecars or Counter()
    summary = TagSummary(
        tally.tagged, tally.failed, seconds, final.path, skipped_done=skipped_done, sidecars=dict(counts)
    )
    if not quiet:
        where = f" -> {summary.output}" if summary.output else ""
        resumed = f", {summary.skipped_done} already done" if summary.skipped_done else ""
        log(
            f"ramtag: tagged {summary.tagged} images, {summary.failed} failed{resumed}{notes}, "
            f"{summary.images_per_second:.1f} img/s{where_ran}{where}"
        )
        if tally.sidecars is not None:
            log(f"ramtag: {describe_counts(counts)}")
    unwritten = f"; {counts['failed']} sidecar(s) could not be written" if counts.get("failed") else ""
    if tally.failed:
        # with --quiet the rows' lines were not printed: name the first, which usually explains them all
        quiet_first = not tally.tagged and tally.first_failure and quiet
        every = f"; none could, the first: {one_line(tally.first_failure)}" if quiet_first else ""
        raise PartialFailure(
            f"{tally.failed} input(s) could not be tagged{every}; see the error column of the output{unwritten}"
        )
    if final.errors:  # the exit status reports the final table, whichever run wrote its error rows
        raise PartialFailure(
            f"{final.errors} input(s) in {summary.output} failed in an earlier run; "
            "--resume --retry-errors tries them again"
        )
    if counts.get("failed"):
        first = f" (first: {tally.first_sidecar_failure})" if tally.first_sidecar_failure else ""
        raise PartialFailure(f"{counts['failed']} sidecar(s) could not be written{first}; the table is complete")
    return summary
