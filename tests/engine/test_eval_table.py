"""ramtag.engine.eval.table: score tables (Parquet, JSONL) matched to annotations by key, their vocabulary
from the metadata or from --labels, and the round trip from `ramtag tag --all-scores`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ramtag.data.thresholds import read_thresholds
from ramtag.engine.eval.table import evaluate_score_table
from ramtag.engine.eval.types import GZSL, MODEL_ARM, MULTILABEL, ZSL, EvalSettings
from ramtag.errors import DataError, UsageError, VocabularyError
from ramtag.metrics import evaluate_scores
from tests.eval_fixtures import (
    FOREIGN,
    GOOD,
    LABELS,
    UNSEEN,
    Bench,
    multi_hot,
    run_cli,
    write_table,
)


def test_score_table_with_prefix_mapping_and_unmatched_keys(bench: Bench, tmp_path: Path):
    rng = np.random.default_rng(7)
    in_table = [name for name in GOOD if name not in ("6", "8")]
    scores = rng.random((len(in_table) + 1, len(LABELS))).astype(np.float32)
    keys = [bench.key(name) for name in in_table] + ["img/not-annotated.png"]
    table = write_table(tmp_path / "scores.parquet", keys, scores, LABELS, errors={bench.key("8"): "truncated"})
    result = evaluate_score_table(table, str(bench.annotations), bench.settings())
    protocol = result.protocols[MULTILABEL]
    assert protocol.keys == [bench.key(name) for name in in_table]
    assert protocol.tally.failed == [(bench.key("8"), "truncated")]
    coverage = result.score_table
    assert coverage["table_rows"] == len(keys) + 1
    assert coverage["table_keys_not_in_annotations_examples"] == ["img/not-annotated.png"]
    not_in_table = sorted(bench.key(n) for n in ("6", "missing", "corrupt"))
    assert sorted(coverage["annotations_not_in_table_examples"]) == not_in_table
    expected = evaluate_scores(scores[:-1], multi_hot(in_table, LABELS), label_names=LABELS)
    assert protocol.arms[MODEL_ARM].metrics.summary() == pytest.approx(expected.summary())
    assert any("have no row in the score table" in warning for warning in result.warnings)


def test_jsonl_score_table_with_absolute_keys_and_shuffled_vocabulary(bench: Bench, tmp_path: Path):
    vocabulary = tuple(reversed(LABELS))
    scores = np.random.default_rng(8).random((len(GOOD), len(LABELS))).astype(np.float32)
    keys = [str(bench.root / "img" / f"{name}.png") for name in GOOD]  # as `ramtag tag @list` keys them
    table = write_table(tmp_path / "scores.jsonl", keys, scores, vocabulary)
    assert (tmp_path / "scores.jsonl.meta.json").exists()
    result = evaluate_score_table(table, str(bench.annotations), bench.settings())
    protocol = result.protocols[MULTILABEL]
    assert protocol.labels == vocabulary
    expected = evaluate_scores(scores, multi_hot(GOOD, vocabulary))
    assert protocol.arms[MODEL_ARM].metrics.summary() == pytest.approx(expected.summary(), abs=1e-7)


def test_score_table_zsl_and_gzsl_are_told_apart_by_vocabulary(bench: Bench, tmp_path: Path):
    scores = np.random.default_rng(9).random((len(GOOD), len(UNSEEN))).astype(np.float32)
    table = write_table(tmp_path / "zsl.parquet", [bench.key(n) for n in GOOD], scores, UNSEEN)
    result = evaluate_score_table(table, str(bench.annotations), bench.settings(unseen=UNSEEN))
    assert list(result.protocols) == [ZSL]
    assert result.protocols[ZSL].keys == [bench.key(n) for n in ("0", "3", "5", "7")]
    partial = write_table(tmp_path / "bad.parquet", [bench.key(n) for n in GOOD], scores, ("car", "cat"))
    with pytest.raises(VocabularyError, match="neither"):
        evaluate_score_table(partial, str(bench.annotations), bench.settings(unseen=UNSEEN))


def test_score_table_bad_inputs(bench: Bench, tmp_path: Path):
    keys = [bench.key(n) for n in GOOD]
    five = np.full((len(GOOD), 5), 0.2, np.float32)
    short = write_table(tmp_path / "short.parquet", keys, five, LABELS[:5])
    with pytest.raises(VocabularyError, match="'boat'"):
        evaluate_score_table(short, str(bench.annotations), bench.settings())
    unnamed = write_table(tmp_path / "unnamed.parquet", keys, five, LABELS[:5], metadata={"model": "x"})
    with pytest.raises(DataError, match="no vocabulary"):
        evaluate_score_table(unnamed, str(bench.annotations), bench.settings())
    six = np.full((len(GOOD), 6), 0.1, np.float32)
    table = write_table(tmp_path / "six.parquet", keys, six, LABELS)
    with pytest.raises(DataError, match="--map-prefix"):  # annotation paths still carry the foreign prefix
        evaluate_score_table(table, str(bench.annotations), EvalSettings(root=str(bench.root)))
    with pytest.raises(UsageError):
        evaluate_score_table(table, str(bench.annotations), bench.settings(baseline=True))
    with pytest.raises(UsageError, match="fingerprints"):
        evaluate_score_table(table, str(bench.annotations), bench.settings(calibrate=True))


def test_scores_written_by_ramtag_tag_evaluate_like_the_model(bench: Bench, runtime, evaluated, tmp_path: Path, capsys):
    """The real round trip: `ramtag tag --all-scores`, then `ramtag eval --scores` (and its thresholds)."""
    labels = tmp_path / "all.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    table = tmp_path / "tags.parquet"
    tag_args = ["tag", str(bench.root / "img"), "-c", str(bench.checkpoint), "--labels", str(labels), "--all-scores",
                "-o", str(table), "--device", "cpu", "--batch-size", "64", "--workers", "0", "--quiet"]
    run_cli(tag_args, capsys)  # exits non-zero: corrupt.png cannot be tagged (it is in the table as an error)
    thresholds = tmp_path / "t.tsv"
    report = tmp_path / "r.json"
    code, _, err = run_cli(
        ["eval", str(bench.annotations), "--scores", str(table), "--root", str(bench.root / "img"),
         "--map-prefix", f"{FOREIGN}/img=", "--json", str(report), "--calibrate", str(thresholds)],
        capsys,
    )
    assert code == 3 and "2 annotated image(s) could not be evaluated" in err, err  # missing.png and corrupt.png
    data = json.loads(report.read_text())
    assert data["score_table"]["annotations_not_in_table_examples"] == ["missing.png"]
    assert data["protocols"][MULTILABEL]["images"]["failed_images"] == [{"key": "corrupt.png", "error": "not an image"}]
    ours = data["protocols"][MULTILABEL]["arms"][MODEL_ARM]["metrics"]
    model = evaluated.protocols[GZSL].arms[MODEL_ARM].metrics.summary()
    assert ours == pytest.approx(model, abs=1e-6)
    vocabulary_fingerprint = runtime.vocabulary_fingerprint(list(LABELS))
    read_thresholds(thresholds).for_vocabulary(LABELS, vocabulary_fingerprint, runtime.fingerprint)


def test_a_score_table_that_matches_nothing_suggests_the_prefix_to_strip():
    from ramtag.engine.eval.table import _prefix_hint

    assert _prefix_hint(["000001.png", "000002.png"], ["data/images/000002.png"]) == "try --map-prefix 'data/images/='"
    assert _prefix_hint(["sub/000002.png"], ["images/sub/000002.png"]) == "try --map-prefix 'images/='"
    assert _prefix_hint(["a.png"], ["images/b.png"]) is None


# ---------------------------------------------------------------------------------------------
# Tables whose metadata is gone: --labels gives the order of the scores column


def _rewritten_by_polars(table: Path, path: Path) -> Path:
    """The table as polars writes it back: the same columns, none of the Parquet schema metadata."""
    import polars as pl
    import pyarrow.parquet as pq

    pl.read_parquet(table).write_parquet(path)
    assert not pq.read_schema(path).metadata or b"vocabulary" not in b"".join(pq.read_schema(path).metadata)
    return path


def test_a_table_without_metadata_takes_its_vocabulary_from_labels(bench: Bench, tmp_path: Path):
    vocabulary = tuple(reversed(LABELS))  # not the annotation file's order: only --labels can tell it
    scores = np.random.default_rng(10).random((len(GOOD), len(LABELS))).astype(np.float32)
    keys = [bench.key(name) for name in GOOD]
    original = write_table(tmp_path / "scores.parquet", keys, scores, vocabulary)
    expected = evaluate_score_table(original, str(bench.annotations), bench.settings())
    rewritten = _rewritten_by_polars(original, tmp_path / "rewritten.parquet")
    jsonl = write_table(tmp_path / "scores.jsonl", keys, scores, vocabulary)
    (tmp_path / "scores.jsonl.meta.json").unlink()  # as `ramtag tag -o - > scores.jsonl` leaves it
    for table in (rewritten, jsonl):
        with pytest.raises(DataError, match="--labels FILE") as refused:
            evaluate_score_table(table, str(bench.annotations), bench.settings())
        assert "order of its scores column" in str(refused.value)
        result = evaluate_score_table(table, str(bench.annotations), bench.settings(labels=vocabulary))
        protocol = result.protocols[MULTILABEL]
        assert protocol.labels == vocabulary
        np.testing.assert_array_equal(protocol.targets, multi_hot(GOOD, vocabulary))
        summary = protocol.arms[MODEL_ARM].metrics.summary()
        assert summary == pytest.approx(expected.protocols[MULTILABEL].arms[MODEL_ARM].metrics.summary())
        assert any("order of --labels" in note for note in result.notes)
    # the annotation file's order is not the table's: the figures differ, so the order was taken from --labels
    misread = evaluate_score_table(rewritten, str(bench.annotations), bench.settings(labels=LABELS))
    assert misread.protocols[MULTILABEL].arms[MODEL_ARM].metrics.mAP != pytest.approx(
        expected.protocols[MULTILABEL].arms[MODEL_ARM].metrics.mAP
    )


def test_labels_that_do_not_fit_a_table_without_metadata_are_refused(bench: Bench, tmp_path: Path):
    scores = np.random.default_rng(11).random((len(GOOD), len(LABELS))).astype(np.float32)
    table = write_table(tmp_path / "scores.parquet", [bench.key(name) for name in GOOD], scores, LABELS)
    rewritten = _rewritten_by_polars(table, tmp_path / "rewritten.parquet")
    with pytest.raises(DataError, match="has 6 scores but --labels lists 7 labels"):
        evaluate_score_table(rewritten, str(bench.annotations), bench.settings(labels=(*LABELS, "zebra")))
    with pytest.raises(UsageError, match="fingerprints"):  # the fingerprints went with the metadata
        evaluate_score_table(rewritten, str(bench.annotations), bench.settings(labels=LABELS, calibrate=True))


def test_cli_scores_with_labels_for_a_rewritten_table(bench: Bench, tmp_path: Path, capsys):
    scores = np.random.default_rng(12).random((len(GOOD), len(LABELS))).astype(np.float32)
    keys = [bench.key(name) for name in GOOD]
    rewritten = _rewritten_by_polars(write_table(tmp_path / "s.parquet", keys, scores, LABELS), tmp_path / "r.parquet")
    labels = tmp_path / "all.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    base = ["eval", str(bench.annotations), "--scores", str(rewritten), "--root", str(bench.root),
            "--map-prefix", f"{FOREIGN}="]
    code, _, err = run_cli(base, capsys)
    assert code == 2 and "--labels FILE" in err and "Traceback" not in err
    report = tmp_path / "report.json"
    code, _, err = run_cli([*base, "--labels", str(labels), "--json", str(report)], capsys)
    assert code == 3, err  # missing.png and corrupt.png have no row
    metrics = json.loads(report.read_text())["protocols"][MULTILABEL]["arms"][MODEL_ARM]["metrics"]
    expected = evaluate_scores(scores, multi_hot(GOOD, LABELS), label_names=LABELS)
    assert metrics["mAP"] == pytest.approx(expected.mAP)
