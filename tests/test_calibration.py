"""ramtag.calibration: thresholds known by construction and brute force over every candidate threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ramtag.metrics as metrics
from ramtag.calibration import (
    STATUS_NO_POSITIVES,
    STATUS_OK,
    STATUS_PRECISION_UNREACHABLE,
    apply_thresholds,
    fit_thresholds,
)
from ramtag.errors import DataError


def _counts(scores: np.ndarray, positives: np.ndarray, threshold: float) -> tuple[float, float, float]:
    tagged = scores >= threshold
    tp = int((tagged & positives).sum())
    if tp == 0:
        return 0.0, 0.0, 0.0
    # F1 as 2 tp / (tagged + positives): one rounding, so equal F1 values compare equal
    return tp / tagged.sum(), tp / positives.sum(), 2 * tp / (tagged.sum() + positives.sum())


def _tie_heavy_case(seed: int, n: int = 40, c: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(n, c)) / 5.0
    targets = (rng.random((n, c)) < 0.25 + 0.4 * scores).astype(np.int64)  # informative but noisy
    targets[:, 0] = 0  # a label with no positives
    return scores, targets


def test_separable_label_gets_its_lowest_positive_score() -> None:
    rng = np.random.default_rng(0)
    positives = rng.uniform(0.6, 1.0, size=12)
    negatives = rng.uniform(0.0, 0.5, size=30)
    scores = np.r_[positives, negatives][:, None]
    targets = np.r_[np.ones(12), np.zeros(30)][:, None]
    fitted = fit_thresholds(scores, targets)
    assert fitted.thresholds[0] == positives.min()
    assert (fitted.precision[0], fitted.recall[0], fitted.f1[0]) == (1.0, 1.0, 1.0)
    assert fitted.status == (STATUS_OK,)


# Ranked scores 10..1 with positives at ranks 1, 2, 4, 7 (4 positives). Tagging the top n gives
# precision 1, 1, 2/3, 3/4, 3/5, 1/2, 4/7, ... and F1 = 2 tp / (n + 4): .4, .667, .571, .75, .667, .6,
# .727, ... so best F1 is at n = 4 (score 7), and the lowest threshold with precision >= 0.75 is
# also n = 4, while >= 0.6 reaches down to n = 5 (score 6) and >= 0.55 to n = 7 (score 4).
RANKED_SCORES = np.arange(10, 0, -1, dtype=np.float64)[:, None]
RANKED_TARGETS = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0])[:, None]


def test_best_f1_on_a_hand_checked_ranking() -> None:
    fitted = fit_thresholds(RANKED_SCORES, RANKED_TARGETS)
    assert fitted.thresholds[0] == 7.0
    assert fitted.precision[0] == 0.75 and fitted.recall[0] == 0.75 and fitted.f1[0] == 0.75


@pytest.mark.parametrize(
    ("target", "threshold", "recall"),
    [(1.0, 9.0, 0.5), (0.75, 7.0, 0.75), (0.6, 6.0, 0.75), (0.55, 4.0, 1.0)],
)
def test_target_precision_on_a_hand_checked_ranking(target: float, threshold: float, recall: float) -> None:
    fitted = fit_thresholds(RANKED_SCORES, RANKED_TARGETS, target_precision=target)
    assert fitted.thresholds[0] == threshold and fitted.recall[0] == recall
    assert fitted.precision[0] >= target


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_best_f1_matches_brute_force(seed: int) -> None:
    scores, targets = _tie_heavy_case(seed)
    fitted = fit_thresholds(scores, targets)
    for j in range(scores.shape[1]):
        positives = targets[:, j] == 1
        if not positives.any():
            assert fitted.thresholds[j] == np.inf and fitted.status[j] == STATUS_NO_POSITIVES
            continue
        candidates = np.unique(scores[:, j])
        f1 = np.array([_counts(scores[:, j], positives, t)[2] for t in candidates])
        best = candidates[f1 == f1.max()].max()  # ties in F1 go to the highest threshold
        assert fitted.thresholds[j] == best
        assert (fitted.precision[j], fitted.recall[j], fitted.f1[j]) == pytest.approx(
            _counts(scores[:, j], positives, best), rel=1e-12
        )


@pytest.mark.parametrize(("seed", "target"), [(4, 0.5), (5, 0.7), (6, 0.9)])
def test_target_precision_matches_brute_force(seed: int, target: float) -> None:
    scores, targets = _tie_heavy_case(seed)
    fitted = fit_thresholds(scores, targets, target_precision=target)
    for j in range(scores.shape[1]):
        positives = targets[:, j] == 1
        candidates = np.unique(scores[:, j])
        reaching = [t for t in candidates if _counts(scores[:, j], positives, t)[0] >= target]
        if not positives.any():
            assert fitted.status[j] == STATUS_NO_POSITIVES and fitted.thresholds[j] == np.inf
        elif not reaching:
            assert fitted.status[j] == STATUS_PRECISION_UNREACHABLE and fitted.thresholds[j] == np.inf
            assert fitted.precision[j] == fitted.recall[j] == fitted.f1[j] == 0.0
        else:
            assert fitted.status[j] == STATUS_OK and fitted.thresholds[j] == min(reaching)


def test_reported_figures_are_what_applying_the_thresholds_gives() -> None:
    scores, targets = _tie_heavy_case(7, n=60, c=10)
    scores = scores.astype(np.float32)
    for target in (None, 0.6):
        fitted = fit_thresholds(scores, targets, target_precision=target)
        tags = apply_thresholds(scores, fitted.thresholds)
        positives = targets == 1
        tp = (tags & positives).sum(axis=0)
        assert not tags[:, fitted.thresholds == np.inf].any()
        ok = np.array([status == STATUS_OK for status in fitted.status])
        assert ok.sum() >= 5
        np.testing.assert_allclose(fitted.precision[ok], tp[ok] / tags.sum(axis=0)[ok], rtol=1e-12)
        np.testing.assert_allclose(fitted.recall[ok], tp[ok] / positives.sum(axis=0)[ok], rtol=1e-12)


def test_blocked_fit_equals_single_block(monkeypatch: pytest.MonkeyPatch) -> None:
    scores, targets = _tie_heavy_case(8, n=50, c=9)
    whole = fit_thresholds(scores, targets, target_precision=0.6)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 60)
    blocked = fit_thresholds(scores, targets, target_precision=0.6)
    np.testing.assert_array_equal(blocked.thresholds, whole.thresholds)
    np.testing.assert_array_equal(blocked.f1, whole.f1)
    assert blocked.status == whole.status


def test_to_dict_is_strict_json_and_names_labels() -> None:
    scores, targets = _tie_heavy_case(9, c=3)
    fitted = fit_thresholds(scores, targets)
    report = json.loads(json.dumps(fitted.to_dict(["none", "b", "c"]), allow_nan=False))
    assert report["objective"] == "f1" and report["target_precision"] is None
    first = report["labels"][0]
    assert first["label"] == "none" and first["threshold"] is None and first["status"] == STATUS_NO_POSITIVES
    assert fitted.labels_with_status(STATUS_NO_POSITIVES) == [0]


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5])
def test_bad_target_precision_is_an_error(target: float) -> None:
    with pytest.raises(DataError, match="target precision"):
        fit_thresholds(RANKED_SCORES, RANKED_TARGETS, target_precision=target)


def test_empty_set_and_mismatched_thresholds_are_errors() -> None:
    with pytest.raises(DataError, match="empty"):
        fit_thresholds(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(DataError, match="do not match"):
        apply_thresholds(np.zeros((3, 2)), [0.5])


def test_write_thresholds_leaves_no_temporary_when_the_write_fails(tmp_path, monkeypatch):
    """A failed write keeps the folder as it was: no half-written target, no temporary beside it."""
    import os

    import pytest

    from ramtag.data.thresholds import write_thresholds

    def failing_replace(source, target):
        raise OSError("disk full")

    # the rename is the step after the temporary holds the whole text: failing there is what once left it behind
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_thresholds(tmp_path / "thresholds.tsv", ["cat"], [0.5], vocabulary_fingerprint="v", model_fingerprint="m")
    assert list(tmp_path.iterdir()) == []
