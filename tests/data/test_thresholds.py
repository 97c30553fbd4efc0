"""Thresholds files: the round trip, refusal for another vocabulary or model, and malformed files."""

from __future__ import annotations

import numpy as np
import pytest

from ramtag.data.thresholds import read_thresholds, write_thresholds
from ramtag.errors import DataError, VocabularyError

LABELS = ["cat", "dog", "car", "tree", "sky"]


def test_thresholds_file_round_trip(tmp_path):
    path = tmp_path / "thresholds.tsv"
    values = np.array([0.05, 0.125, np.inf, 1e-4, 0.3], dtype=np.float32)
    write_thresholds(
        path, LABELS, values, vocabulary_fingerprint="v" * 16, model_fingerprint="m" * 16, info={"objective": "f1"}
    )
    parsed = read_thresholds(path)
    assert parsed.info == {"objective": "f1"}
    np.testing.assert_array_equal(parsed.for_vocabulary(LABELS, "v" * 16, "m" * 16), values)
    reordered = list(reversed(LABELS))
    np.testing.assert_array_equal(parsed.for_vocabulary(reordered, "v" * 16, "m" * 16), values[::-1])


def test_thresholds_for_another_vocabulary_or_model_are_refused(tmp_path):
    path = tmp_path / "thresholds.tsv"
    write_thresholds(path, LABELS, [0.1] * 5, vocabulary_fingerprint="aaaa", model_fingerprint="bbbb")
    parsed = read_thresholds(path)
    with pytest.raises(VocabularyError, match="another vocabulary"):
        parsed.for_vocabulary(LABELS, "cccc", "bbbb")
    with pytest.raises(VocabularyError, match="another model"):
        parsed.for_vocabulary(LABELS, "aaaa", "cccc")
    with pytest.raises(VocabularyError, match="no threshold for 1 label"):
        parsed.for_vocabulary(LABELS + ["moon"], "aaaa", "bbbb")


def test_malformed_thresholds_files(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("# vocabulary_fingerprint: a\ndog\t0.1\ncat 0.2\n")
    with pytest.raises(DataError, match=r"t.tsv:3: expected label<TAB>threshold"):
        read_thresholds(path)
    path.write_text("dog\t0.1\ndog\t0.2\n")
    with pytest.raises(DataError, match="t.tsv:2: label 'dog' repeats line 1"):
        read_thresholds(path)
    path.write_text("dog\thigh\n")
    with pytest.raises(DataError, match="not a number"):
        read_thresholds(path)
    path.write_text("dog\t0.1\n")
    with pytest.raises(VocabularyError, match="no '# vocabulary_fingerprint:' header"):
        read_thresholds(path).for_vocabulary(["dog"], "a", "b")
