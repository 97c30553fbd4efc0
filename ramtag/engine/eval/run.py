"""`ramtag eval` from end to end: check where the reports go, score, then write the reports on rank 0.

Messages go to stderr through the shared reporter (warnings as they arise, a progress bar on a terminal); the
results table goes to stdout, or to stderr when a report itself goes to stdout (``--json -``, ``--markdown -``).
Every report target is checked before a model loads, so that no one waits through an evaluation for a report
that cannot be written.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ramtag.engine import dist
from ramtag.engine.eval.calibrate import write_calibration
from ramtag.engine.eval.model import evaluate_model
from ramtag.engine.eval.plots import require_matplotlib, write_plots
from ramtag.engine.eval.render import (
    calibration_summary,
    calibration_table,
    markdown_summary,
    report_dict,
    results_table,
    write_json_report,
    write_markdown,
)
from ramtag.engine.eval.table import evaluate_score_table
from ramtag.engine.eval.types import EvalResult, EvalSettings
from ramtag.engine.reporter import Reporter
from ramtag.errors import PartialFailure, UsageError

STDOUT = "-"
"""The file name that means stdout (and, for a label file, stdin)."""


@dataclass
class EvalOutputs:
    """Where a run's reports go; None writes none. The results table always goes to the terminal."""

    json: str | None = None
    """The full report as JSON; ``-``: stdout."""
    markdown: str | None = None
    """A Markdown summary; ``-``: stdout."""
    plots: str | None = None
    """A folder for PNG plots (needs matplotlib, the ``plots`` extra)."""
    thresholds: str | None = None
    """Calibrated per-label thresholds, in the format ``ramtag tag --thresholds`` reads."""
    command: str | None = None
    """The command line, recorded in the JSON report."""

    def check(self) -> None:
        """Refuse, before anything runs, the targets that could not be written after it."""
        if self.json == STDOUT and self.markdown == STDOUT:
            raise UsageError("only one of --json and --markdown can go to stdout ('-')")
        for option, target in (("--json", self.json), ("--markdown", self.markdown), ("--calibrate", self.thresholds)):
            if target is not None and target != STDOUT and Path(target).is_dir():
                raise UsageError(f"{option} {target}: a folder; give a file name")
        if self.plots is not None:
            if Path(self.plots).exists() and not Path(self.plots).is_dir():
                raise UsageError(f"--plots {self.plots}: a file; give a folder")
            require_matplotlib()

    @property
    def report_on_stdout(self) -> bool:
        return STDOUT in (self.json, self.markdown)


def read_label_list(path: str) -> tuple[str, ...]:
    """The labels of a label file (one per line, ``#`` comments); ``-`` reads them from stdin."""
    from ramtag.data.vocab import read_labels

    return tuple(read_labels(sys.stdin if path == STDOUT else path).labels)


def run_eval(
    data: Sequence[str] | str,
    settings: EvalSettings,
    outputs: EvalOutputs,
    *,
    load_model: Callable[[str], Any] | None = None,
    scores: str | os.PathLike | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> None:
    """Evaluate ``load_model(device)``'s runtime (on every rank of a torchrun) or the score table ``scores``
    on DATA, and write ``outputs`` on rank 0.

    Raises :class:`~ramtag.errors.PartialFailure` after writing everything when some annotated images could not
    be evaluated.
    """
    outputs.check()
    if (scores is None) == (load_model is None):
        raise UsageError("evaluate either a model or a score table (--scores)")
    info = dist.setup(device) if scores is None else dist.DistInfo(0, 1, 0)
    try:
        reporter = Reporter(quiet=quiet or not info.is_main, transient=True)

        def log(message: str) -> None:
            reporter.log(f"ramtag: warning: {message}", style="yellow")

        if scores is not None:
            result = evaluate_score_table(scores, data, settings, log=log)
        else:
            runtime = load_model(dist.device_for(info, device))
            with reporter:
                result = evaluate_model(runtime, data, settings, log=log, progress=_protocol_progress(reporter))
        if result is None:  # not rank 0
            return
        write_reports(result, outputs, reporter, log)
    finally:
        dist.teardown()


def write_reports(result: EvalResult, outputs: EvalOutputs, messages: Reporter, log: Callable[[str], None]) -> None:
    """Plots, thresholds, the results (and calibration) tables, the JSON report and the Markdown summary.

    ``messages`` shows the run's messages on stderr; ``log`` prints a warning."""
    from rich.console import Console

    plot_files = write_plots(result, outputs.plots) if outputs.plots is not None else []
    if outputs.thresholds is not None and result.calibration is not None:
        write_calibration(outputs.thresholds, result.calibration)
        messages.log(f"ramtag: thresholds written to {outputs.thresholds}")
    out = Console(file=sys.stderr if outputs.report_on_stdout else sys.stdout, width=_width())
    out.print(results_table(result))
    if result.calibration is not None:
        out.print(calibration_table(result.calibration))
        messages.log(f"ramtag: {calibration_summary(result.calibration)}")
    if outputs.json is not None:
        write_json_report(outputs.json, report_dict(result, command=outputs.command, plots=plot_files))
    if outputs.markdown is not None:
        relative = Path(outputs.markdown).parent if outputs.markdown != STDOUT else None
        write_markdown(outputs.markdown, markdown_summary(result, plots=plot_files, relative_to=relative))
    missed = result.images_not_evaluated()
    if missed:
        raise PartialFailure(
            f"{missed} annotated image(s) could not be evaluated (see the warnings and the report); "
            "the metrics leave them out"
        )


def _width() -> int | None:
    return None if sys.stdout.isatty() else 160


def _protocol_progress(reporter: Reporter) -> Callable[[str, int, int | None], None] | None:
    """A line of the bar per protocol, added as its scoring starts; None when no bar shows."""
    if not reporter.has_bar:
        return None
    tasks: dict[str, Any] = {}

    def update(protocol: str, done: int, total: int | None) -> None:
        if protocol not in tasks:
            tasks[protocol] = reporter.task(f"scoring ({protocol})", total)
        reporter.update(tasks[protocol], completed=done)

    return update


__all__ = ["EvalOutputs", "read_label_list", "run_eval", "write_reports"]
