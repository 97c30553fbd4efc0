"""Tag selection: top k, a global threshold or per-label thresholds, checked against a plain reference."""

from __future__ import annotations

import numpy as np
import pytest

from ramtag.selection import select_tags

LABELS = ["cat", "dog", "car", "tree", "sky"]


def scores_for(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + rows)
    raw = rng.random((rows, len(LABELS))).astype(np.float32)
    return raw / raw.sum(axis=1, keepdims=True)


def reference_selection(row: np.ndarray, top_k: int, limits: np.ndarray) -> list[tuple[int, float]]:
    ranked = sorted(range(len(row)), key=lambda index: (-row[index], index))
    if top_k:
        ranked = ranked[:top_k]
    return [(index, float(row[index])) for index in ranked if row[index] >= limits[index]]


@pytest.mark.parametrize("top_k", [0, 1, 3, 9])
@pytest.mark.parametrize("mode", ["none", "global", "per_label"])
def test_select_tags_matches_a_plain_reference(top_k, mode):
    scores = scores_for(7, seed=3)
    scores[0, 1] = scores[0, 3]  # a tie: the lower label index comes first
    per_label = np.array([0.1, 0.3, 0.0, np.inf, 0.2], dtype=np.float32)
    kwargs, limits = {}, np.full(len(LABELS), -np.inf, dtype=np.float32)
    if mode == "global":
        kwargs, limits = {"threshold": 0.2}, np.full(len(LABELS), 0.2, dtype=np.float32)
    elif mode == "per_label":
        kwargs, limits = {"per_label": per_label}, per_label
    selection = select_tags(scores, top_k=top_k, **kwargs)
    for index, row in enumerate(scores):
        assert selection.row(index) == reference_selection(row, top_k, limits)


def test_selection_may_leave_an_image_without_tags():
    selection = select_tags(np.array([[0.5, 0.5, 0, 0, 0], [0.1, 0.2, 0.3, 0.2, 0.2]]), top_k=2, threshold=0.4)
    assert selection.counts.tolist() == [2, 0]
