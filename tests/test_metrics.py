"""ramtag.metrics against scikit-learn, recorded outputs of the reference's metrics code, derived cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import ramtag.metrics as metrics
from ramtag.errors import DataError
from ramtag.metrics import (
    average_precision,
    evaluate_scores,
    mean_average_precision,
    top_k_mask,
    top_k_metrics,
)

# Scores and targets (seeded) with the outputs of the reference's multilabel_evaluation for each k,
# recorded by running its utils/metrics.py outside this repository; see tests/fixtures/metrics/README.md.
REFERENCE_FIXTURE = Path(__file__).parent / "fixtures" / "metrics" / "reference_topk.npz"
REFERENCE_NAMES = ("CP", "CR", "CF1", "OP", "OR", "OF1")


def _sklearn_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.array(
        [average_precision_score(targets[:, j], scores[:, j]) for j in range(scores.shape[1])]
    )


def _random_case(seed: int, n: int, c: int, levels: int | None = None, rate: float = 0.3):
    rng = np.random.default_rng(seed)
    if levels is None:
        scores = rng.normal(size=(n, c))
    else:  # few distinct values: many ties, some spanning positives and negatives
        scores = rng.integers(0, levels, size=(n, c)).astype(np.float64)
    targets = (rng.random((n, c)) < rate).astype(np.int64)
    targets[0, :] = 1  # every label has a positive
    return scores, targets


@pytest.mark.parametrize(
    ("seed", "n", "c", "levels"),
    [(0, 50, 7, None), (1, 400, 11, None), (2, 60, 9, 3), (3, 300, 5, 2), (4, 120, 6, 10)],
)
def test_average_precision_matches_sklearn(seed: int, n: int, c: int, levels: int | None) -> None:
    scores, targets = _random_case(seed, n, c, levels)
    np.testing.assert_allclose(average_precision(scores, targets), _sklearn_ap(scores, targets), rtol=1e-12)


def test_average_precision_does_not_depend_on_order_of_tied_images() -> None:
    scores, targets = _random_case(5, 80, 6, levels=3)
    order = np.random.default_rng(6).permutation(len(scores))
    np.testing.assert_allclose(
        average_precision(scores[order], targets[order]), average_precision(scores, targets), rtol=1e-12
    )


def test_all_equal_scores_give_prevalence_as_ap() -> None:
    _, targets = _random_case(7, 40, 5)
    scores = np.zeros(targets.shape)
    ap = average_precision(scores, targets)
    np.testing.assert_allclose(ap, targets.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(ap, _sklearn_ap(scores, targets), rtol=1e-12)


def test_perfect_and_reversed_ranking() -> None:
    targets = np.array([[1], [1], [0], [0], [0]])
    assert average_precision(np.array([[5.0], [4.0], [3.0], [2.0], [1.0]]), targets)[0] == 1.0
    # positives at ranks 4 and 5: (1/4 + 2/5) / 2
    reversed_ap = average_precision(-np.array([[5.0], [4.0], [3.0], [2.0], [1.0]]), targets)[0]
    assert reversed_ap == pytest.approx(0.325)


def test_label_without_positives_is_nan_and_left_out_of_the_mean() -> None:
    scores, targets = _random_case(8, 60, 6)
    targets[:, 2] = 0
    ap = average_precision(scores, targets)
    assert np.isnan(ap[2]) and not np.isnan(np.delete(ap, 2)).any()
    value, evaluated = mean_average_precision(scores, targets)
    assert evaluated.tolist() == [True, True, False, True, True, True]
    with_positives = np.delete(np.arange(6), 2)
    expected = _sklearn_ap(scores[:, with_positives], targets[:, with_positives]).mean()
    assert value == pytest.approx(expected, rel=1e-12)
    report = evaluate_scores(scores, targets, label_names=list("abcdef"))
    assert report.mAP == pytest.approx(value, rel=1e-12)
    assert report.n_labels_evaluated == 5 and report.labels_without_positives == ["c"]


def test_no_positive_anywhere_is_an_error_not_nan() -> None:
    scores = np.random.default_rng(9).random((10, 4))
    with pytest.raises(DataError, match="mAP is undefined"):
        mean_average_precision(scores, np.zeros((10, 4)))
    with pytest.raises(DataError, match="mAP is undefined"):
        evaluate_scores(scores, np.zeros((10, 4)))


def test_image_without_positives_still_counts_in_average_precision() -> None:
    scores, targets = _random_case(10, 30, 4)
    negative_image_scores = np.full((1, 4), 99.0)  # ranked first for every label
    scores2 = np.vstack([scores, negative_image_scores])
    targets2 = np.vstack([targets, np.zeros((1, 4), dtype=np.int64)])
    np.testing.assert_allclose(
        average_precision(scores2, targets2), _sklearn_ap(scores2, targets2), rtol=1e-12
    )
    assert (average_precision(scores2, targets2) < average_precision(scores, targets)).all()


@pytest.fixture(scope="module")
def reference_case() -> dict[str, np.ndarray]:
    with np.load(REFERENCE_FIXTURE) as data:
        return {key: data[key] for key in data.files}


def test_top_k_matches_reference_outputs(reference_case: dict[str, np.ndarray]) -> None:
    scores, targets = reference_case["scores"], reference_case["targets"]
    assert (targets == -1).any() and (targets.sum(axis=0) <= 0).any() and (targets.max(axis=1) <= 0).any()
    for k in reference_case["ks"]:
        result = top_k_metrics(scores, targets, int(k))
        for name in REFERENCE_NAMES:
            expected = float(reference_case[f"{name}@{k}"])
            assert getattr(result, name) == pytest.approx(expected, rel=1e-12, abs=0)


def test_report_uses_overall_figures_as_paper_p_r_f1_at_k(reference_case: dict[str, np.ndarray]) -> None:
    report = evaluate_scores(reference_case["scores"], reference_case["targets"], ks=(3, 5))
    summary = report.summary()
    for k in (3, 5):
        assert summary[f"P@{k}"] == pytest.approx(float(reference_case[f"OP@{k}"]), rel=1e-12)
        assert summary[f"R@{k}"] == pytest.approx(float(reference_case[f"OR@{k}"]), rel=1e-12)
        assert summary[f"F1@{k}"] == pytest.approx(float(reference_case[f"OF1@{k}"]), rel=1e-12)
        assert summary[f"CF1@{k}"] == pytest.approx(float(reference_case[f"CF1@{k}"]), rel=1e-12)


def test_k_larger_than_label_count_predicts_every_label(reference_case: dict[str, np.ndarray]) -> None:
    scores, targets = reference_case["scores"], reference_case["targets"]
    n_labels = scores.shape[1]
    assert n_labels in reference_case["ks"]  # the reference ran k = C; torch.topk refuses k > C
    result = top_k_metrics(scores, targets, 10 * n_labels)
    assert result.k_effective == n_labels
    for name in REFERENCE_NAMES:
        assert getattr(result, name) == pytest.approx(float(reference_case[f"{name}@{n_labels}"]), rel=1e-12)


def test_per_label_precision_recall_f1_follow_counts() -> None:
    scores, targets = _random_case(11, 70, 8, levels=4)
    result = top_k_metrics(scores, targets, 3)
    predicted = top_k_mask(scores, 3)
    positive = targets == 1
    tp = (predicted & positive).sum(axis=0)
    np.testing.assert_array_equal(result.tp, tp)
    np.testing.assert_array_equal(result.fp, (predicted & ~positive).sum(axis=0))
    np.testing.assert_array_equal(result.fn, (~predicted & positive).sum(axis=0))
    for j in range(8):
        if tp[j] == 0:
            assert result.precision[j] == result.recall[j] == result.f1[j] == 0
        else:
            p, r = tp[j] / predicted[:, j].sum(), tp[j] / positive[:, j].sum()
            assert result.f1[j] == pytest.approx(2 * p * r / (p + r), rel=1e-12)
    assert result.OP == pytest.approx(tp.sum() / (70 * 3), rel=1e-12)


def test_image_without_positives_lowers_overall_precision_only() -> None:
    scores, targets = _random_case(12, 40, 6)
    before = top_k_metrics(scores, targets, 3)
    after = top_k_metrics(np.vstack([scores, np.zeros((1, 6))]), np.vstack([targets, np.zeros((1, 6))]), 3)
    assert after.OP == pytest.approx(before.OP * 40 / 41, rel=1e-12)
    assert after.OR == before.OR


def test_top_k_mask_breaks_ties_by_label_index() -> None:
    scores = np.random.default_rng(13).integers(0, 3, size=(50, 9)).astype(np.float32)
    for k in (1, 3, 5, 9):
        expected = np.zeros(scores.shape, dtype=bool)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        np.put_along_axis(expected, order, True, axis=1)
        np.testing.assert_array_equal(top_k_mask(scores, k), expected)


def test_all_equal_scores_predict_the_first_k_labels() -> None:
    _, targets = _random_case(14, 30, 6)
    result = top_k_metrics(np.ones((30, 6)), targets, 2)
    np.testing.assert_array_equal(result.tp, np.r_[targets[:, :2].sum(axis=0), np.zeros(4)])


def test_blocked_computation_equals_single_block(monkeypatch: pytest.MonkeyPatch) -> None:
    scores, targets = _random_case(15, 90, 13, levels=5)
    whole = evaluate_scores(scores, targets, ks=(1, 3, 5))
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 100)  # forces many label and image blocks
    blocked = evaluate_scores(scores, targets, ks=(1, 3, 5))
    assert blocked.summary() == whole.summary()
    np.testing.assert_array_equal(blocked.ap, whole.ap)


def test_inputs_accept_torch_float32_and_minus_one_negatives() -> None:
    scores, targets = _random_case(16, 40, 5)
    expected = evaluate_scores(scores.astype(np.float32), targets)
    with_minus_one = np.where(targets == 1, 1, -1)
    from_torch = evaluate_scores(
        torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(with_minus_one)
    )
    assert from_torch.summary() == expected.summary()


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.zeros((3, 2)), np.zeros((3, 3)), "same shape"),
        (np.zeros(3), np.zeros(3), "2-D"),
        (np.array([[np.nan, 1.0]]), np.array([[1, 0]]), "NaN"),
        (np.zeros((2, 2)), np.array([[1, 2], [0, 0]]), "found 2"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "empty set"),
    ],
)
def test_bad_inputs_raise_data_error(scores, targets, message: str) -> None:
    with pytest.raises(DataError, match=message):
        evaluate_scores(scores, targets)


def test_report_to_dict_is_strict_json(reference_case: dict[str, np.ndarray]) -> None:
    names = [f"label{i}" for i in range(reference_case["scores"].shape[1])]
    report = evaluate_scores(reference_case["scores"], reference_case["targets"], label_names=names)
    as_json = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    rows = {row["label"]: row for row in as_json["per_label"]}
    assert as_json["labels_without_positives"] == ["label4"] and rows["label4"]["AP"] is None
    assert set(rows["label0"]) == {"label", "n_positives", "AP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5"}
    with pytest.raises(DataError, match="label names"):
        evaluate_scores(reference_case["scores"], reference_case["targets"], label_names=names[:-1])
