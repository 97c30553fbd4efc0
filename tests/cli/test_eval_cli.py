"""`ramtag eval` (ramtag.cli.eval and ramtag.engine.eval.run): reports, calibration, options and their errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ramtag.calibration import fit_thresholds
from ramtag.data.thresholds import read_thresholds
from ramtag.engine.eval.types import GZSL, MODEL_ARM, MULTILABEL, ZSL
from tests.eval_fixtures import GOOD, LABELS, Bench, direct_scores, multi_hot, run_cli


def test_cli_reports_calibration_round_trip(bench: Bench, runtime, tmp_path: Path, capsys):
    report, summary, thresholds = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "t.tsv"
    code, out, err = run_cli(
        bench.args("--unseen", str(bench.unseen), "--json", str(report), "--markdown", str(summary),
                   "--calibrate", str(thresholds)),
        capsys,
    )
    assert code == 3, err  # the bench has a missing and a corrupt image
    assert "GZSL" in out and "mAP" in out and "F1@3 (OF1)" in out  # results on stdout
    assert "2 image(s) skipped" in err  # problems on stderr
    data = json.loads(report.read_text())
    assert data["model"]["fingerprint"] == runtime.fingerprint
    assert set(data["protocols"]) == {ZSL, GZSL}
    gzsl = data["protocols"][GZSL]
    assert gzsl["images"]["images"] == 10 and gzsl["images"]["failed"] == 2
    assert [row["label"] for row in gzsl["arms"][MODEL_ARM]["per_label"]] == list(LABELS)
    assert "## Results (%)" in summary.read_text()
    # the thresholds file is what `ramtag tag --thresholds` reads, for this vocabulary and model
    vocabulary_fingerprint = runtime.vocabulary_fingerprint(list(LABELS))
    loaded = read_thresholds(thresholds).for_vocabulary(LABELS, vocabulary_fingerprint, runtime.fingerprint)
    scores = direct_scores(runtime, bench, GOOD, LABELS)
    fitted = fit_thresholds(scores, multi_hot(GOOD, LABELS))
    np.testing.assert_allclose(loaded, fitted.thresholds.astype(np.float32), rtol=1e-6)
    rows = data["calibration"]["labels"]
    assert [row["precision"] for row in rows] == pytest.approx(fitted.precision.tolist())
    assert [row["recall"] for row in rows] == pytest.approx(fitted.recall.tolist())


@pytest.mark.parametrize("scores", [False, True], ids=["model", "score-table"])
def test_plots_without_matplotlib_fail_before_the_model_loads(bench: Bench, tmp_path: Path, capsys, monkeypatch,
                                                             scores):
    """Without the 'plots' extra, --plots is a usage error before any model loads or table is read."""
    from ramtag.cli.options import ModelChoice

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the 'plots' extra

    def no_loading(self):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ModelChoice, "load", no_loading)
    report = tmp_path / "r.json"
    if scores:
        argv = ["eval", str(bench.annotations), "--scores", str(tmp_path / "absent.parquet")]
    else:
        argv = bench.args()
    code, out, err = run_cli([*argv, "--json", str(report), "--plots", str(tmp_path / "plots")], capsys)
    assert code == 2, err
    assert "pip install 'ramtag[plots]'" in err and "matplotlib" in err
    assert "Traceback" not in err and "loading" not in err and out == ""
    assert not report.exists() and not (tmp_path / "plots").exists()


def test_cli_target_precision(bench: Bench, tmp_path: Path, capsys):
    report, thresholds = tmp_path / "r.json", tmp_path / "t.tsv"
    args = bench.args("--calibrate", str(thresholds), "--target-precision", "0.6", "--json", str(report))
    code, _, err = run_cli(args, capsys)
    assert code == 3, err
    calibration = json.loads(report.read_text())["calibration"]
    assert calibration["objective"] == "precision" and calibration["target_precision"] == 0.6
    assert all(row["precision"] >= 0.6 for row in calibration["labels"] if row["status"] == "ok")
    assert "# target_precision: 0.6" in thresholds.read_text()


def test_labels_without_positives_are_reported_not_averaged(bench: Bench, tmp_path: Path, capsys):
    labels = tmp_path / "all.txt"
    labels.write_text("\n".join([*LABELS, "zebra"]) + "\n")
    report = tmp_path / "r.json"
    code, _, err = run_cli(bench.args("--labels", str(labels), "--json", str(report)), capsys)
    assert code == 3, err
    arm = json.loads(report.read_text())["protocols"][MULTILABEL]["arms"][MODEL_ARM]
    assert arm["labels_without_positives"] == ["zebra"]
    per_label = {row["label"]: row["AP"] for row in arm["per_label"]}
    assert per_label["zebra"] is None
    assert arm["metrics"]["mAP"] == pytest.approx(np.mean([per_label[label] for label in LABELS]))
    assert "no positive image" in err


def test_json_to_stdout_keeps_the_table_on_stderr(bench: Bench, capsys):
    code, out, err = run_cli(bench.args("--json", "-", "--top-k", "1"), capsys)
    assert code == 3, err
    report = json.loads(out)
    assert report["configuration"]["ks"] == [1]
    assert "F1@1" in report["protocols"][MULTILABEL]["arms"][MODEL_ARM]["metrics"]
    assert "mAP" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-precision", "0.5"], "--calibrate"),
        (["--scores", "x.parquet"], "--scores"),
        (["--unseen", "{unseen_none}"], "no image has any"),
        (["--batch-size", "0"], "--batch-size"),
        (["--ot-stop", "never"], "stop"),
    ],
)
def test_cli_bad_options_and_inputs(bench: Bench, tmp_path: Path, capsys, extra, message):
    unseen_none = tmp_path / "none.txt"
    unseen_none.write_text("zebra\n")
    labels = tmp_path / "all.txt"
    labels.write_text("\n".join([*LABELS, "zebra"]) + "\n")
    extra = [item.replace("{unseen_none}", str(unseen_none)) for item in extra]
    if "--unseen" in extra:
        extra += ["--labels", str(labels)]
    code, _, err = run_cli(bench.args(*extra), capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_every_image_failing_is_an_error(tmp_path: Path, bench: Bench, capsys):
    document = {"images": [["img/a.png", ["cat"]], ["img/b.png", ["dog"]]], "classes": ["cat", "dog"]}
    (tmp_path / "gone.json").write_text(json.dumps(document))
    code, _, err = run_cli(
        ["eval", str(tmp_path / "gone.json"), "-c", str(bench.checkpoint), "--root", str(tmp_path), "--workers", "0",
         "--device", "cpu"],
        capsys,
    )
    assert code == 2 and "failed to load" in err
