"""PNG plots of an :class:`~ramtag.engine.eval.types.EvalResult`: per-label AP bars, precision-recall curves of
the best and worst labels, and the arms side by side.

Plots need matplotlib, the optional ``plots`` extra. Without it, asking for plots is a usage error, raised by
:func:`require_matplotlib` before anything is scored, so that no one waits through an evaluation for plots
that cannot be drawn.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ramtag.engine.eval.render import arm_summary, ranked_labels
from ramtag.engine.eval.types import EvalResult, ProtocolResult
from ramtag.errors import OutputError, UsageError

_PLOT_LABELS = 30
"""AP bar charts show every label up to twice this many, else the best and the worst this many."""
_PR_CURVES = 3

MATPLOTLIB_MISSING = "--plots needs matplotlib, which is not installed: pip install 'ramtag[plots]'"


def require_matplotlib() -> None:
    """Refuse plots up front (a usage error, exit status 2) when matplotlib is not installed."""
    _pyplot()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def precision_recall_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct score threshold of one label, highest threshold first."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    tp = np.cumsum(positives[order].astype(np.int64))
    ends = np.append(sorted_scores[:-1] != sorted_scores[1:], True)
    tagged = np.arange(1, len(scores) + 1)[ends]
    tp = tp[ends]
    total = max(int(positives.sum()), 1)
    return tp / total, tp / tagged


def write_plots(result: EvalResult, directory: str | os.PathLike) -> list[str]:
    """Per protocol: sorted per-label AP bars, PR curves of the best and worst labels, arms side by side.

    Returns the files written; without matplotlib, raises :data:`MATPLOTLIB_MISSING` as a usage error."""
    plt = _pyplot()
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror or exc}") from exc
    files = []
    for name, protocol in result.protocols.items():
        arm = next(iter(protocol.arms))
        files.append(_ap_bars(plt, protocol, arm, folder / f"{name}-ap.png"))
        files.append(_pr_curves(plt, protocol, arm, folder / f"{name}-pr.png"))
        if len(protocol.arms) > 1:
            files.append(_arm_bars(plt, result, protocol, folder / f"{name}-arms.png"))
    return [str(path) for path in files]


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)
    return path


def _ap_bars(plt, protocol: ProtocolResult, arm: str, path: Path) -> Path:
    ranked = ranked_labels(protocol, arm)
    title = f"{protocol.protocol.title}: AP per label ({protocol.arms[arm].title})"
    if len(ranked) > 2 * _PLOT_LABELS:
        title += f", best and worst {_PLOT_LABELS} of {len(ranked)}"
        ranked = ranked[:_PLOT_LABELS] + ranked[-_PLOT_LABELS:]
    figure, axes = plt.subplots(figsize=(7, max(2.5, 0.22 * len(ranked) + 1)))
    names = [name for name, _, _ in ranked][::-1]
    values = [100 * ap for _, ap, _ in ranked][::-1]
    axes.barh(range(len(names)), values, color="#4C72B0")
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_xlim(0, 100)
    axes.set_xlabel("AP (%)")
    axes.set_title(title, fontsize=9)
    return _save(plt, figure, path)


def _pr_curves(plt, protocol: ProtocolResult, arm: str, path: Path) -> Path:
    ranked = ranked_labels(protocol, arm)
    chosen = ranked if len(ranked) <= 2 * _PR_CURVES else ranked[:_PR_CURVES] + ranked[-_PR_CURVES:]
    scores = protocol.arms[arm].scores
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for rank, (name, ap, _) in enumerate(chosen):
        column = protocol.labels.index(name)
        recall, precision = precision_recall_curve(scores[:, column], protocol.targets[:, column] > 0)
        style = "-" if rank < _PR_CURVES or len(chosen) <= _PR_CURVES else "--"
        label = f"{name} (AP {100 * ap:.1f})"
        axes.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", linestyle=style, label=label)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    title = f"{protocol.protocol.title}: precision-recall, best and worst labels ({protocol.arms[arm].title})"
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="lower left")
    return _save(plt, figure, path)


def _arm_bars(plt, result: EvalResult, protocol: ProtocolResult, path: Path) -> Path:
    keys = ["mAP"] + [f"F1@{k}" for k in result.settings.ks]
    arms = list(protocol.arms)
    width = 0.8 / len(arms)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for index, arm in enumerate(arms):
        summary = arm_summary(protocol, arm)
        positions = np.arange(len(keys)) + index * width
        axes.bar(positions, [100 * (summary.get(key) or 0.0) for key in keys], width, label=protocol.arms[arm].title)
    axes.set_xticks(np.arange(len(keys)) + width * (len(arms) - 1) / 2, keys)
    axes.set_ylabel("%")
    axes.set_title(f"{protocol.protocol.title}: the loaded model against the baselines", fontsize=9)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(arms), frameon=False)
    return _save(plt, figure, path)


__all__ = ["MATPLOTLIB_MISSING", "precision_recall_curve", "require_matplotlib", "write_plots"]
