"""Render an :class:`~ramtag.engine.eval.types.EvalResult`: rich tables, a JSON report, Markdown.

Figures in tables and Markdown are percentages with two decimals, as the paper prints them; the
JSON report keeps fractions in [0, 1]. PNG plots are :mod:`ramtag.engine.eval.plots`; which files a run
writes is :mod:`ramtag.engine.eval.outputs`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from ramtag.atomic import write_text
from ramtag.engine.eval.types import GZSL, Calibration, EvalResult, ProtocolResult
from ramtag.errors import OutputError

_CALIBRATION_ROWS = 100
"""Labels the Markdown calibration table lists; the JSON report has them all."""


def metric_rows(result: EvalResult) -> list[tuple[str, str]]:
    """(key in the summary, row title) in display order: mAP first, then per k overall and per-class."""
    rows = [("mAP", "mAP")]
    if GZSL in result.protocols:
        rows += [("mAP_seen", "mAP (seen labels)"), ("mAP_unseen", "mAP (unseen labels)")]
    for k in result.settings.ks:
        rows += [(f"P@{k}", f"P@{k} (OP)"), (f"R@{k}", f"R@{k} (OR)"), (f"F1@{k}", f"F1@{k} (OF1)")]
        rows += [(f"CP@{k}", f"CP@{k}"), (f"CR@{k}", f"CR@{k}"), (f"CF1@{k}", f"CF1@{k}")]
    return rows


def arm_summary(protocol: ProtocolResult, arm: str) -> dict[str, float | None]:
    """One arm's scalar figures under one protocol, GZSL's seen and unseen mAP included."""
    result = protocol.arms[arm]
    return {**result.metrics.summary(), **result.extra}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def _columns(result: EvalResult) -> list[tuple[ProtocolResult, str]]:
    return [(protocol, arm) for protocol in result.protocols.values() for arm in protocol.arms]


# ---------------------------------------------------------------------------------------------
# Terminal


def results_table(result: EvalResult) -> Table:
    """Metrics (rows) by protocol and arm (columns), in percent."""
    table = Table(title=f"ramtag eval: {result.data}", caption="values in %; P/R/F1@k are overall (OP/OR/OF1)")
    table.add_column("metric", style="bold")
    columns = _columns(result)
    for protocol, arm in columns:
        table.add_column(f"{protocol.protocol.title}\n{protocol.arms[arm].title}", justify="right")
    summaries = [arm_summary(protocol, arm) for protocol, arm in columns]
    for key, title in metric_rows(result):
        table.add_row(title, *[_percent(summary.get(key)) for summary in summaries])
    images = [f"{protocol.tally.images}" for protocol, _ in columns]
    table.add_row("images", *images, style="dim")
    labels = [f"{protocol.arms[arm].metrics.n_labels_evaluated}/{len(protocol.labels)}" for protocol, arm in columns]
    table.add_row("labels with positives", *labels, style="dim")
    return table


_CALIBRATION_COLUMNS = (
    ("label", "left"), ("threshold", "right"), ("P %", "right"), ("R %", "right"), ("F1 %", "right"),
    ("positives", "right"), ("status", "left"),
)
"""Columns of the calibration tables (terminal and Markdown), with their terminal alignment."""


def _calibration_row(calibration: Calibration, index: int) -> list[str]:
    data = calibration.thresholds
    threshold = data.thresholds[index]
    return [
        calibration.labels[index],
        "inf" if not np.isfinite(threshold) else f"{threshold:.4g}",
        _percent(data.precision[index]),
        _percent(data.recall[index]),
        _percent(data.f1[index]),
        str(int(data.n_positives[index])),
        data.status[index],
    ]


def calibration_table(calibration: Calibration, max_rows: int | None = 40) -> Table:
    """Threshold, precision, recall and F1 per label on the calibration set."""
    data = calibration.thresholds
    objective = "best F1" if data.target_precision is None else f"precision >= {data.target_precision}"
    table = Table(title=f"thresholds ({objective}, {calibration.protocol}, {calibration.n_images} images)")
    for name, justify in _CALIBRATION_COLUMNS:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    order = range(len(calibration.labels))
    for index in list(order)[: max_rows if max_rows is not None else None]:
        table.add_row(*_calibration_row(calibration, index))
    hidden = len(calibration.labels) - (max_rows if max_rows is not None else len(calibration.labels))
    if hidden > 0:
        table.caption = f"{hidden} more label(s) in the JSON and Markdown reports"
    return table


def calibration_summary(calibration: Calibration) -> str:
    data = calibration.thresholds
    ok = np.array([status == "ok" for status in data.status])
    if not ok.any():
        return "calibration: no label got a threshold"
    return (
        f"calibration: {int(ok.sum())}/{len(ok)} label(s) with a threshold; mean precision "
        f"{_percent(float(data.precision[ok].mean()))}%, recall {_percent(float(data.recall[ok].mean()))}%, "
        f"F1 {_percent(float(data.f1[ok].mean()))}% on the calibration set"
    )


# ---------------------------------------------------------------------------------------------
# JSON


def _protocol_dict(protocol: ProtocolResult) -> dict[str, Any]:
    arms = {}
    for name, arm in protocol.arms.items():
        body = arm.metrics.to_dict(per_label=True)
        body["metrics"].update(arm.extra)
        arms[name] = {"title": arm.title, **body}
    return {
        "title": protocol.protocol.title,
        "labels": list(protocol.labels),
        "restricted_to_images_with": list(protocol.protocol.require_any) if protocol.protocol.require_any else None,
        "images": protocol.tally.to_dict(),
        "arms": arms,
    }


def report_dict(result: EvalResult, *, command: str | None = None, plots: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON report: metrics, per-label figures, configuration, model fingerprint, data problems."""
    from ramtag import __version__

    return {
        "ramtag_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "data": result.data,
        "configuration": {**result.settings.to_dict(), "world_size": result.world_size},
        "model": result.model,
        "label_space": result.label_space.to_dict(),
        "protocols": {name: _protocol_dict(protocol) for name, protocol in result.protocols.items()},
        "calibration": result.calibration.to_dict() if result.calibration is not None else None,
        "score_table": result.score_table,
        "warnings": list(result.warnings),
        "notes": list(result.notes),
        "plots": list(plots),
    }


def _write_text(path: str | os.PathLike, text: str) -> None:
    if os.fspath(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        write_text(path, text)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_json_report(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """Write the report (``-``: stdout), atomically for files."""
    _write_text(path, json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> list[str]:
    rule = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    return [_md_row(header), _md_row(rule), *(_md_row(row) for row in rows)]


def ranked_labels(protocol: ProtocolResult, arm: str) -> list[tuple[str, float, int]]:
    """(label, AP, positives) of the labels with a positive image, best AP first."""
    metrics = protocol.arms[arm].metrics
    rows = [
        (protocol.labels[i], float(metrics.ap[i]), int(metrics.n_positives[i]))
        for i in np.flatnonzero(metrics.evaluated)
    ]
    return sorted(rows, key=lambda row: (-row[1], row[0]))


def markdown_summary(
    result: EvalResult, *, plots: Sequence[str] = (), relative_to: str | os.PathLike | None = None
) -> str:
    """A readable summary: headline table, per-label extremes, data problems, calibration, plots."""
    lines = [f"# ramtag eval: {result.data}", ""]
    model = result.model
    if "score_table" in model:
        lines.append(f"- Scores: `{model['score_table']}` (no model run)")
    else:
        source = ", ".join(f"{k}: `{v}`" for k, v in model.get("source", {}).items())
        kind = "trained" if model.get("trained") else "training-free"
        lines.append(f"- Model: {source} (fingerprint `{model.get('fingerprint')}`, {kind})")
    space = result.label_space
    unseen = f", {len(space.unseen)} unseen" if space.unseen else ""
    lines.append(f"- Labels: {len(space.labels)} ({space.origin}){unseen}")
    for protocol in result.protocols.values():
        tally = protocol.tally
        lines.append(
            f"- {protocol.protocol.title}: {tally.images} images, {len(protocol.labels)} labels"
            + (f", {len(tally.failed)} images skipped" if tally.failed else "")
        )
    lines += ["", "## Results (%)", ""]
    columns = _columns(result)
    header = ["metric"] + [f"{p.protocol.title} {p.arms[a].title}" for p, a in columns]
    summaries = [arm_summary(p, a) for p, a in columns]
    rows = [[title] + [_percent(summary.get(key)) for summary in summaries] for key, title in metric_rows(result)]
    lines += _md_table(header, rows)
    lines += [
        "",
        "P@k, R@k, F1@k are the overall figures (OP, OR, OF1) the paper reports; CP/CR/CF1 are per-label means.",
    ]
    for protocol in result.protocols.values():
        arm = next(iter(protocol.arms))
        ranked = ranked_labels(protocol, arm)
        title = f"{protocol.protocol.title}, {protocol.arms[arm].title}"
        shown = ranked if len(ranked) <= 20 else ranked[:10] + ranked[-10:]
        heading = "AP per label" if len(ranked) <= 20 else "AP per label: best 10 and worst 10"
        lines += ["", f"## {heading} ({title})", ""]
        lines += _md_table(["label", "AP %", "positives"], [[name, _percent(ap), str(n)] for name, ap, n in shown])
        missing = protocol.arms[arm].metrics.labels_without_positives
        if missing:
            lines += ["", f"Labels without a positive image (left out of mAP): {', '.join(missing)}"]
    if result.score_table is not None:
        table = result.score_table
        lines += [
            "",
            "## Score table coverage",
            "",
            f"- rows: {table['table_rows']} ({table['table_error_rows']} error rows); "
            f"matched to annotations: {table['matched']}",
            f"- table keys without an annotated image: {table['table_keys_not_in_annotations']}",
            f"- annotated images without a table row: {table['annotations_not_in_table']}",
        ]
    if result.calibration is not None:
        lines += ["", "## Calibrated thresholds", "", calibration_summary(result.calibration), ""]
        lines += _calibration_markdown(result.calibration)
    if result.warnings or result.notes:
        lines += ["", "## Warnings and notes", ""]
        lines += [f"- {message}" for message in [*result.warnings, *result.notes]]
    if plots:
        lines += ["", "## Plots", ""]
        for plot in plots:
            shown = os.path.relpath(plot, relative_to) if relative_to is not None else plot
            lines += [f"![{Path(plot).stem}]({shown})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _calibration_markdown(calibration: Calibration) -> list[str]:
    rows = [_calibration_row(calibration, index) for index in range(min(len(calibration.labels), _CALIBRATION_ROWS))]
    lines = _md_table([name for name, _ in _CALIBRATION_COLUMNS], rows)
    if len(calibration.labels) > _CALIBRATION_ROWS:
        lines += ["", f"({len(calibration.labels) - _CALIBRATION_ROWS} more labels in the JSON report)"]
    return lines


def write_markdown(path: str | os.PathLike, text: str) -> None:
    _write_text(path, text)


__all__ = [
    "arm_summary",
    "calibration_summary",
    "calibration_table",
    "markdown_summary",
    "metric_rows",
    "ranked_labels",
    "report_dict",
    "results_table",
    "write_json_report",
    "write_markdown",
]
