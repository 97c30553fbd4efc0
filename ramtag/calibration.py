"""Per-label score thresholds fitted on a labelled calibration set (pure numpy, no files).

A label is tagged when ``score >= threshold``. Candidate thresholds are the distinct scores of
the calibration set, so every reported precision, recall and F1 is exactly what that threshold
gives on it. Two objectives:

* best F1 (default): the threshold with the highest F1; among equal F1, the highest threshold
  (fewest tags);
* ``target_precision=P``: the lowest threshold whose precision is at least P, i.e. the largest
  recall that keeps precision >= P.

Fallback: a label with no positive image, or whose precision never reaches the target, gets
threshold +inf (never tagged), precision/recall/F1 of 0 and a status saying why; the caller
reports those labels rather than guessing a threshold for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ramtag.errors import DataError
from ramtag.metrics import as_numpy, iter_ranked_labels, validate_inputs

STATUS_OK = "ok"
STATUS_NO_POSITIVES = "no_positives"
STATUS_PRECISION_UNREACHABLE = "precision_unreachable"


@dataclass(frozen=True)
class LabelThresholds:
    """Fitted thresholds ``[C]`` and what each gives on the calibration set."""

    thresholds: np.ndarray
    precision: np.ndarray = field(repr=False)
    recall: np.ndarray = field(repr=False)
    f1: np.ndarray = field(repr=False)
    n_positives: np.ndarray = field(repr=False)
    status: tuple[str, ...] = field(repr=False)
    target_precision: float | None = None

    @property
    def objective(self) -> str:
        return "f1" if self.target_precision is None else "precision"

    def labels_with_status(self, status: str) -> list[int]:
        return [index for index, value in enumerate(self.status) if value == status]

    def to_dict(self, label_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready: objective, target and one row per label (an infinite threshold is None)."""
        if label_names is not None and len(label_names) != len(self.thresholds):
            raise DataError(f"{len(label_names)} label names for {len(self.thresholds)} thresholds")
        rows = []
        for index, threshold in enumerate(self.thresholds):
            rows.append(
                {
                    "label": label_names[index] if label_names is not None else str(index),
                    "threshold": float(threshold) if np.isfinite(threshold) else None,
                    "precision": float(self.precision[index]),
                    "recall": float(self.recall[index]),
                    "f1": float(self.f1[index]),
                    "n_positives": int(self.n_positives[index]),
                    "status": self.status[index],
                }
            )
        return {"objective": self.objective, "target_precision": self.target_precision, "labels": rows}


def fit_thresholds(
    scores: Any, targets: Any, target_precision: float | None = None
) -> LabelThresholds:
    """Fit one threshold per label on ``scores``/``targets`` ``[N, C]`` (see the module docstring)."""
    score_array, positives = validate_inputs(scores, targets)
    if target_precision is not None and not 0.0 < target_precision <= 1.0:
        raise DataError(f"target precision must be in (0, 1], got {target_precision}")
    n_images, n_labels = score_array.shape
    if n_images == 0:
        raise DataError("cannot calibrate thresholds on an empty set")
    thresholds = np.full(n_labels, np.inf)
    precision = np.zeros(n_labels)
    recall = np.zeros(n_labels)
    f1 = np.zeros(n_labels)
    n_positives = positives.sum(axis=0, dtype=np.int64)
    found = np.zeros(n_labels, dtype=bool)
    for block in iter_ranked_labels(score_array, positives):
        tp = block.cumulative_tp
        n_tagged = np.arange(1, n_images + 1)
        n_pos = tp[:, -1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            block_precision = tp / n_tagged
            block_recall = tp / n_pos
            block_f1 = 2.0 * tp / (n_tagged + n_pos)
        # Only the last image of a tie run is a reachable cut; elsewhere mark the position invalid.
        if target_precision is None:
            objective = np.where(block.tie_group_end & (tp > 0), block_f1, -1.0)
            best = np.argmax(objective, axis=1)  # first maximum = highest threshold
            ok = objective[np.arange(len(best)), best] > 0
        else:
            reaches = block.tie_group_end & (tp > 0) & (block_precision >= target_precision)
            best = n_images - 1 - np.argmax(reaches[:, ::-1], axis=1)  # last True = lowest threshold
            ok = reaches[np.arange(len(best)), best]
        rows = np.arange(len(best))
        columns = np.arange(n_labels)[block.labels]
        chosen = columns[ok]
        thresholds[chosen] = block.sorted_scores[rows, best][ok]
        precision[chosen] = block_precision[rows, best][ok]
        recall[chosen] = block_recall[rows, best][ok]
        f1[chosen] = block_f1[rows, best][ok]
        found[chosen] = True
    status = tuple(
        STATUS_OK
        if found[index]
        else STATUS_NO_POSITIVES
        if n_positives[index] == 0
        else STATUS_PRECISION_UNREACHABLE
        for index in range(n_labels)
    )
    return LabelThresholds(
        thresholds=thresholds,
        precision=precision,
        recall=recall,
        f1=f1,
        n_positives=n_positives,
        status=status,
        target_precision=target_precision,
    )


def apply_thresholds(scores: Any, thresholds: Any) -> np.ndarray:
    """Boolean ``[N, C]`` tags: ``score >= threshold`` per label (+inf never tags)."""
    score_array = as_numpy(scores)
    threshold_array = np.asarray(thresholds, dtype=np.float64)
    if score_array.ndim != 2 or threshold_array.shape != (score_array.shape[1],):
        raise DataError(
            f"{threshold_array.shape} thresholds do not match scores of shape {score_array.shape}"
        )
    return score_array >= threshold_array
