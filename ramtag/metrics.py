"""Multi-label metrics: average precision, mAP and the reference's top-k CP/CR/CF1/OP/OR/OF1.

Pure numpy (torch tensors are accepted and converted); no files. Inputs are a score matrix ``[N, C]``
(N images, C labels; higher means more likely) and a target matrix of the same shape holding 1 for a
positive, 0 or -1 for a negative (the reference maps -1 to 0). NaN scores are an error; +-inf are allowed.

Large inputs are processed in blocks of labels (for AP) or of images (for top-k), each fully
vectorised, so peak extra memory stays around ``_BLOCK_ELEMENTS`` entries whatever N and C are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ramtag.errors import DataError

# About 2M entries per block: a handful of int64/float64 temporaries stay near 100 MB.
_BLOCK_ELEMENTS = 1 << 21


def as_numpy(array: Any) -> np.ndarray:
    """A numpy view of an array-like or a torch tensor (detached, on the CPU)."""
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch here
        array = array.detach().cpu()
        if str(array.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            array = array.float()
        array = array.numpy()
    return np.asarray(array)


def validate_inputs(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(scores, positives)``: floating scores and a boolean positive mask, both ``[N, C]``.

    Raises DataError on shape mismatch, non-2-D input, NaN scores or targets outside {-1, 0, 1}.
    """
    score_array = as_numpy(scores)
    target_array = as_numpy(targets)
    if score_array.ndim != 2:
        raise DataError(f"scores must be a 2-D [images, labels] matrix, got shape {score_array.shape}")
    if score_array.shape != target_array.shape:
        raise DataError(
            f"scores {score_array.shape} and targets {target_array.shape} must have the same shape"
        )
    if not np.issubdtype(score_array.dtype, np.floating):
        score_array = score_array.astype(np.float64)
    if np.isnan(score_array).any():
        raise DataError("scores contain NaN")
    if target_array.dtype == np.bool_:
        return score_array, target_array
    valid = (target_array == 1) | (target_array == 0) | (target_array == -1)
    if not valid.all():
        bad = np.argwhere(~valid)[0]
        raise DataError(
            f"targets must be 1 (positive), 0 or -1 (negative); found {target_array[tuple(bad)].item()!r} "
            f"at image {bad[0]}, label {bad[1]}"
        )
    return score_array, target_array == 1


@dataclass(frozen=True)
class RankedLabels:
    """A block of labels, one row each, with the images sorted by descending score.

    Arrays are ``[labels in block, N]``. The order among tied scores is unspecified, so anything
    computed from a block must only read ``cumulative_tp`` where ``tie_group_end`` is True (the last
    image of a run of equal scores): thresholds only exist between distinct scores.
    """

    labels: slice
    sorted_scores: np.ndarray
    sorted_positives: np.ndarray
    cumulative_tp: np.ndarray
    tie_group_end: np.ndarray


def iter_ranked_labels(scores: np.ndarray, positives: np.ndarray) -> Iterator[RankedLabels]:
    """Yield validated ``[N, C]`` inputs as blocks of labels with images ranked by score."""
    n_images, n_labels = scores.shape
    width = max(1, min(n_labels, _BLOCK_ELEMENTS // max(n_images, 1)))
    for start in range(0, n_labels, width):
        columns = slice(start, min(n_labels, start + width))
        # One contiguous row per label: sorting along the last axis is several times faster.
        block = np.ascontiguousarray(scores[:, columns].T)
        # Unstable sort (much faster than stable); tie order never reaches a result, see above.
        order = np.argsort(-block, axis=1)
        sorted_scores = np.take_along_axis(block, order, axis=1)
        sorted_positives = np.take_along_axis(np.ascontiguousarray(positives[:, columns].T), order, axis=1)
        group_end = np.empty(sorted_scores.shape, dtype=bool)
        group_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
        group_end[:, -1:] = True
        yield RankedLabels(
            labels=columns,
            sorted_scores=sorted_scores,
            sorted_positives=sorted_positives,
            cumulative_tp=np.cumsum(sorted_positives, axis=1, dtype=np.int64),
            tie_group_end=group_end,
        )


def _tie_group_end_index(group_end: np.ndarray) -> np.ndarray:
    """For each position, the index where its tie group ends (the next True at or after it)."""
    n_images = group_end.shape[1]
    positions = np.broadcast_to(np.arange(n_images), group_end.shape)
    marked = np.where(group_end, positions, n_images - 1)
    return np.minimum.accumulate(marked[:, ::-1], axis=1)[:, ::-1]


def average_precision(scores: Any, targets: Any) -> np.ndarray:
    """Per-label average precision over images, ``[C]`` float64.

    AP = sum over thresholds of (R_t - R_{t-1}) * P_t, with one threshold per distinct score
    (sklearn's ``average_precision_score``, no interpolation). Tied scores form one step: every
    positive in a run of equal scores gets the precision measured after the whole run, so the
    value never depends on the order of tied images. A label with no positive image has no
    defined AP and is NaN here; :func:`mean_average_precision` leaves it out of the mean.
    """
    return _average_precision_validated(*validate_inputs(scores, targets))


def _average_precision_validated(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    n_images, n_labels = scores.shape
    ap = np.full(n_labels, np.nan)
    if n_images == 0:
        return ap
    for block in iter_ranked_labels(scores, positives):
        end = _tie_group_end_index(block.tie_group_end)
        precision_at_end = np.take_along_axis(block.cumulative_tp, end, axis=1) / (end + 1.0)
        n_positive = block.cumulative_tp[:, -1]
        summed = np.where(block.sorted_positives, precision_at_end, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[block.labels] = np.where(n_positive > 0, summed / n_positive, np.nan)
    return ap


def mean_average_precision(scores: Any, targets: Any) -> tuple[float, np.ndarray]:
    """Return ``(mAP, evaluated)``: mean AP over labels with at least one positive, and that mask.

    Labels without positives are excluded (never NaN in the mean). Raises DataError when no label
    has a positive, since mAP is then undefined.
    """
    ap = average_precision(scores, targets)
    evaluated = ~np.isnan(ap)
    if not evaluated.any():
        raise DataError("no label has a positive image: mAP is undefined")
    return float(ap[evaluated].mean()), evaluated


def _harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean ``[N, C]`` mask of each image's k highest scores (all labels when k >= C).

    Ties at the k-th score go to the lower label index, so the result is deterministic (the
    reference uses ``torch.topk``, whose choice among ties is unspecified).
    """
    n_images, n_labels = scores.shape
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
    if k >= n_labels:
        return np.ones(scores.shape, dtype=bool)
    kth_value = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    above = scores > kth_value
    at_kth = scores == kth_value
    places_left = k - above.sum(axis=1, keepdims=True)
    return above | (at_kth & (np.cumsum(at_kth, axis=1) <= places_left))


@dataclass(frozen=True)
class TopKMetrics:
    """Metrics of predicting each image's top-k labels, as the reference's ``utils/metrics.py``.

    Per label: precision tp/(tp+fp) and recall tp/(tp+fn), both 0 when tp = 0; F1 their harmonic
    mean. CP and CR average those over all labels (labels with no positives included, at 0, as the
    reference does); CF1 is the harmonic mean of CP and CR. OP = sum tp / (N * k), OR = sum tp /
    sum positives, OF1 their harmonic mean: these overall figures are the paper's P@k, R@k, F1@k.
    When k exceeds the number of labels every label is predicted and ``k_effective`` = C.
    """

    k: int
    k_effective: int
    CP: float
    CR: float
    CF1: float
    OP: float
    OR: float
    OF1: float
    tp: np.ndarray = field(repr=False)
    fp: np.ndarray = field(repr=False)
    fn: np.ndarray = field(repr=False)
    precision: np.ndarray = field(repr=False)
    recall: np.ndarray = field(repr=False)
    f1: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float]:
        """The scalar figures keyed as ``CP@k`` ... ``OF1@k``, plus ``P@k``, ``R@k``, ``F1@k``."""
        k = self.k
        out = {f"{name}@{k}": getattr(self, name) for name in ("CP", "CR", "CF1", "OP", "OR", "OF1")}
        out.update({f"P@{k}": self.OP, f"R@{k}": self.OR, f"F1@{k}": self.OF1})
        return out


def top_k_metrics(scores: Any, targets: Any, k: int) -> TopKMetrics:
    """Top-k CP, CR, CF1, OP, OR, OF1 and per-label P, R, F1 (see :class:`TopKMetrics`)."""
    score_array, positives = validate_inputs(scores, targets)
    return _top_k_from_validated(score_array, positives, [k])[0]


def _top_k_from_validated(
    scores: np.ndarray, positives: np.ndarray, ks: Sequence[int]
) -> list[TopKMetrics]:
    n_images, n_labels = scores.shape
    tp = np.zeros((len(ks), n_labels), dtype=np.int64)
    predicted = np.zeros((len(ks), n_labels), dtype=np.int64)
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(n_labels, 1))
    for start in range(0, n_images, rows_per_block):
        rows = slice(start, start + rows_per_block)
        block_scores, block_positives = scores[rows], positives[rows]
        for index, k in enumerate(ks):
            mask = top_k_mask(block_scores, k)
            tp[index] += (mask & block_positives).sum(axis=0)
            predicted[index] += mask.sum(axis=0)
    n_positive = positives.sum(axis=0, dtype=np.int64)
    results = []
    for index, k in enumerate(ks):
        label_tp = tp[index]
        label_fp = predicted[index] - label_tp
        label_fn = n_positive - label_tp
        hit = label_tp > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(hit, label_tp / np.maximum(predicted[index], 1), 0.0)
            recall = np.where(hit, label_tp / np.maximum(n_positive, 1), 0.0)
            f1 = np.where(hit, 2 * precision * recall / (precision + recall), 0.0)
        cp = float(precision.mean()) if n_labels else 0.0
        cr = float(recall.mean()) if n_labels else 0.0
        total_tp = int(label_tp.sum())
        total_predicted = int(predicted[index].sum())
        total_positive = int(n_positive.sum())
        op = total_tp / total_predicted if total_predicted else 0.0
        overall_recall = total_tp / total_positive if total_positive else 0.0
        results.append(
            TopKMetrics(
                k=k,
                k_effective=min(k, n_labels),
                CP=cp,
                CR=cr,
                CF1=_harmonic_mean(cp, cr),
                OP=op,
                OR=overall_recall,
                OF1=_harmonic_mean(op, overall_recall),
                tp=label_tp,
                fp=label_fp,
                fn=label_fn,
                precision=precision,
                recall=recall,
                f1=f1,
            )
        )
    return results


def _json_float(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


@dataclass(frozen=True)
class MetricsReport:
    """Everything :func:`evaluate_scores` measures; ``to_dict()`` is JSON-ready (NaN becomes None)."""

    n_images: int
    n_labels: int
    mAP: float
    ap: np.ndarray = field(repr=False)
    n_positives: np.ndarray = field(repr=False)
    top_k: dict[int, TopKMetrics] = field(repr=False)
    label_names: tuple[str, ...] | None = field(default=None, repr=False)

    @property
    def evaluated(self) -> np.ndarray:
        """Mask of labels with at least one positive (the labels mAP averages over)."""
        return self.n_positives > 0

    @property
    def n_labels_evaluated(self) -> int:
        return int(self.evaluated.sum())

    def label_name(self, index: int) -> str:
        return self.label_names[index] if self.label_names is not None else str(index)

    @property
    def labels_without_positives(self) -> list[str]:
        return [self.label_name(i) for i in np.flatnonzero(~self.evaluated)]

    def summary(self) -> dict[str, float]:
        """Headline scalars: mAP then, per k, P@k, R@k, F1@k (overall) and CP/CR/CF1/OP/OR/OF1@k."""
        out: dict[str, float] = {"mAP": self.mAP}
        for metrics in self.top_k.values():
            out.update(metrics.summary())
        return out

    def per_label(self) -> list[dict[str, Any]]:
        rows = []
        for index in range(self.n_labels):
            row: dict[str, Any] = {
                "label": self.label_name(index),
                "n_positives": int(self.n_positives[index]),
                "AP": _json_float(self.ap[index]),
            }
            for k, metrics in self.top_k.items():
                row[f"P@{k}"] = float(metrics.precision[index])
                row[f"R@{k}"] = float(metrics.recall[index])
                row[f"F1@{k}"] = float(metrics.f1[index])
            rows.append(row)
        return rows

    def to_dict(self, per_label: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_images": self.n_images,
            "n_labels": self.n_labels,
            "n_labels_evaluated": self.n_labels_evaluated,
            "labels_without_positives": self.labels_without_positives,
            "metrics": self.summary(),
            "k_effective": {str(k): m.k_effective for k, m in self.top_k.items()},
        }
        if per_label:
            out["per_label"] = self.per_label()
        return out


def evaluate_scores(
    scores: Any,
    targets: Any,
    ks: Sequence[int] = (3, 5),
    label_names: Sequence[str] | None = None,
) -> MetricsReport:
    """Compute mAP, per-label AP and top-k metrics for every k in ``ks``.

    Raises DataError on an empty set (no images or no labels), when no label has a positive
    (mAP undefined), or when ``label_names`` does not match the number of labels.
    """
    score_array, positives = validate_inputs(scores, targets)
    n_images, n_labels = score_array.shape
    if n_images == 0 or n_labels == 0:
        raise DataError(f"cannot evaluate an empty set ({n_images} images, {n_labels} labels)")
    if label_names is not None and len(label_names) != n_labels:
        raise DataError(f"{len(label_names)} label names for {n_labels} score columns")
    unique_ks = list(dict.fromkeys(int(k) for k in ks))
    ap = _average_precision_validated(score_array, positives)
    n_positives = positives.sum(axis=0, dtype=np.int64)
    if not (n_positives > 0).any():
        raise DataError("no label has a positive image: mAP is undefined")
    top_k = _top_k_from_validated(score_array, positives, unique_ks)
    return MetricsReport(
        n_images=n_images,
        n_labels=n_labels,
        mAP=float(np.nanmean(ap)),
        ap=ap,
        n_positives=n_positives,
        top_k={metrics.k: metrics for metrics in top_k},
        label_names=tuple(label_names) if label_names is not None else None,
    )
