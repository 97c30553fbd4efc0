"""`ramtag eval` and the engine behind it: protocols, baselines, score tables, calibration, reports, torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ramtag.calibration import fit_thresholds
from ramtag.cli import main
from ramtag.data.images import decode_image
from ramtag.data.thresholds import read_thresholds
from ramtag.data.writers import TagBatch, TagTableWriter, prepare_output
from ramtag.engine.eval_protocol import (
    CLIP_GLOBAL_ARM,
    GZSL,
    MODEL_ARM,
    MULTILABEL,
    TRAINING_FREE_ARM,
    ZSL,
    EvalSettings,
)
from ramtag.engine.evaluate import evaluate_model
from ramtag.engine.score_table import evaluate_score_table
from ramtag.engine.report import PLOTS_SKIPPED, markdown_summary, report_dict, results_table
from ramtag.engine.runtime import load_runtime
from ramtag.errors import DataError, UsageError, VocabularyError
from ramtag.metrics import evaluate_scores
from tests.io_fixtures import write_image

LABELS = ("cat", "dog", "car", "tree", "sky", "boat")
UNSEEN = ("car", "boat")
FOREIGN = "/mnt/nas/someone/data"
# Image index -> labels. 9 has none; "missing" and "corrupt" cannot be decoded.
ANNOTATIONS = {
    "0": ["cat", "car"],
    "1": ["dog"],
    "2": ["tree", "sky"],
    "3": ["boat"],
    "4": ["cat", "dog", "sky"],
    "5": ["car", "boat"],
    "6": ["tree"],
    "7": ["dog", "boat"],
    "8": ["sky"],
    "9": [],
    "missing": ["car"],
    "corrupt": ["boat", "dog"],
}
GOOD = [str(i) for i in range(10)]


@dataclass
class Bench:
    root: Path
    checkpoint: Path
    annotations: Path
    unseen: Path

    def key(self, name: str) -> str:
        return f"img/{name}.png"

    def args(self, *extra: str) -> list[str]:
        return [
            "eval", str(self.annotations), "--checkpoint", str(self.checkpoint), "--root", str(self.root),
            "--map-prefix", f"{FOREIGN}=", "--workers", "0", "--device", "cpu", "--batch-size", "64", *extra,
        ]

    def settings(self, **overrides) -> EvalSettings:
        values = dict(root=str(self.root), prefix_map=(f"{FOREIGN}=",), batch_size=64, workers=0)
        values.update(overrides)
        return EvalSettings(**values)


def tiny_checkpoint(path: Path) -> Path:
    """A trained-mode RAM checkpoint around a tiny OpenAI-shaped CLIP, backbone included."""
    import open_clip

    from ramtag.model.checkpoint import save_checkpoint
    from ramtag.model.config import RamConfig
    from ramtag.model.ram import RamModel

    torch.manual_seed(0)
    clip = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2),
        text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=1, layers=2),
        quick_gelu=True,
    )
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(100.0))
    config = RamConfig(
        backbone="tiny", pretrained=None, adapter_layers=(1,), adapter_tokens=2, prompt_layers=(1,),
        prompt_tokens=2, trained=True, preprocessing={"image_size": 32},
    )
    model = RamModel(clip, config).eval()
    with torch.no_grad():  # a visible adapter: its output conv starts near zero otherwise
        for name, parameter in model.trainable_parameters().items():
            if "adapter" in name and parameter.ndim > 1:
                parameter.normal_(0.0, 0.05)
    return save_checkpoint(path, model, include_backbone=True)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    root = tmp_path_factory.mktemp("eval")
    for index, name in enumerate(GOOD):
        write_image(root / "img" / f"{name}.png", seed=100 + index)
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG broken")
    document = {
        "images": [[f"{FOREIGN}/img/{name}.png", labels] for name, labels in ANNOTATIONS.items()],
        "classes": list(LABELS),
    }
    annotations = root / "test.json"
    annotations.write_text(json.dumps(document))
    unseen = root / "unseen.txt"
    unseen.write_text("\n".join(UNSEEN) + "\n")
    return Bench(root, tiny_checkpoint(root / "tiny.safetensors"), annotations, unseen)


@pytest.fixture(scope="module")
def runtime(bench: Bench):
    return load_runtime(bench.checkpoint, device="cpu")


# Direct scoring encodes only the labels it scores, the pipeline all labels at once: text features differ
# by float rounding of batched matrix products (~1e-7), which the local logit's 1/tau_loc = 500 amplifies.
SCORE_TOLERANCE = 1e-5


def direct_scores(runtime, bench: Bench, names: list[str], labels, field: str = "scores") -> np.ndarray:
    """Score the images in one batch, outside the evaluation pipeline."""
    transform = runtime.transform()
    images = torch.stack([transform(decode_image(bench.root / "img" / f"{name}.png")) for name in names])
    output = runtime.score(images, runtime.encode_labels(list(labels)))
    return getattr(output, field).float().numpy()


def multi_hot(names: list[str], labels) -> np.ndarray:
    return np.array([[int(label in ANNOTATIONS[name]) for label in labels] for name in names], dtype=np.uint8)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# Protocols


@pytest.fixture(scope="module")
def evaluated(bench: Bench, runtime):
    """ZSL and GZSL with the baselines, as `ramtag eval --unseen ... --baseline` runs them."""
    return evaluate_model(runtime, str(bench.annotations), bench.settings(unseen=UNSEEN, baseline=True))


def test_zsl_and_gzsl_sets_and_scores(bench: Bench, runtime, evaluated):
    assert list(evaluated.protocols) == [ZSL, GZSL]
    zsl, gzsl = evaluated.protocols[ZSL], evaluated.protocols[GZSL]
    # ZSL: the decodable images with at least one unseen label, scored over the unseen labels only
    zsl_names = ["0", "3", "5", "7"]
    assert zsl.keys == [bench.key(name) for name in zsl_names]
    assert zsl.labels == UNSEEN
    assert zsl.targets.tolist() == [[1, 0], [0, 1], [1, 1], [0, 1]]
    assert sorted(key for key, _ in zsl.tally.failed) == [bench.key("corrupt"), bench.key("missing")]
    np.testing.assert_allclose(zsl.arms[MODEL_ARM].scores, direct_scores(runtime, bench, zsl_names, UNSEEN), atol=SCORE_TOLERANCE)
    # GZSL: every image, all labels
    assert gzsl.keys == [bench.key(name) for name in GOOD]
    assert gzsl.labels == LABELS
    np.testing.assert_array_equal(gzsl.targets, multi_hot(GOOD, LABELS))
    gzsl_scores = direct_scores(runtime, bench, GOOD, LABELS)
    np.testing.assert_allclose(gzsl.arms[MODEL_ARM].scores, gzsl_scores, atol=SCORE_TOLERANCE)
    expected = evaluate_scores(gzsl_scores, multi_hot(GOOD, LABELS), label_names=LABELS)
    assert gzsl.arms[MODEL_ARM].metrics.summary() == pytest.approx(expected.summary(), abs=1e-6)
    # seen/unseen mAP split the same per-label APs
    ap = dict(zip(LABELS, expected.ap))
    assert gzsl.arms[MODEL_ARM].extra["mAP_unseen"] == pytest.approx(np.mean([ap[label] for label in UNSEEN]))
    # ZSL scores come from their own pass: not the GZSL columns of the unseen labels
    columns = [LABELS.index(label) for label in UNSEEN]
    restricted = gzsl.arms[MODEL_ARM].scores[[GOOD.index(name) for name in zsl_names]][:, columns]
    assert not np.allclose(zsl.arms[MODEL_ARM].scores, restricted / restricted.sum(1, keepdims=True), atol=1e-4)


def test_baseline_arms_match_a_separately_loaded_training_free_model(bench: Bench, evaluated):
    free = load_runtime(bench.checkpoint, device="cpu", overrides={"trained": False})
    assert not free.config.trained
    for name, labels in ((ZSL, UNSEEN), (GZSL, LABELS)):
        protocol = evaluated.protocols[name]
        arms = protocol.arms
        assert list(arms) == [MODEL_ARM, TRAINING_FREE_ARM, CLIP_GLOBAL_ARM]
        names = [key.split("/")[1].removesuffix(".png") for key in protocol.keys]
        np.testing.assert_allclose(arms[TRAINING_FREE_ARM].scores, direct_scores(free, bench, names, labels), atol=SCORE_TOLERANCE)
        clip = direct_scores(free, bench, names, labels, "global_scores")
        np.testing.assert_allclose(arms[CLIP_GLOBAL_ARM].scores, clip, atol=SCORE_TOLERANCE)
    gzsl = evaluated.protocols[GZSL].arms
    assert not np.allclose(gzsl[MODEL_ARM].scores, gzsl[TRAINING_FREE_ARM].scores, atol=1e-4)
    # a training-free model is its own training-free arm: one forward feeds both of its arms
    plain = evaluate_model(free, str(bench.annotations), bench.settings(baseline=True))
    assert list(plain.protocols) == [MULTILABEL]
    protocol = plain.protocols[MULTILABEL]
    assert list(protocol.arms) == [MODEL_ARM, CLIP_GLOBAL_ARM] and plain.notes
    assert protocol.keys == [bench.key(name) for name in GOOD]
    assert protocol.tally.images_without_labels == 1  # image 9 stays, a negative for every label
    np.testing.assert_array_equal(protocol.arms[MODEL_ARM].scores, evaluated.protocols[GZSL].arms[TRAINING_FREE_ARM].scores)


# ---------------------------------------------------------------------------------------------
# Score tables


def write_table(path: Path, keys: list[str], scores: np.ndarray, labels, errors: dict[str, str] | None = None, metadata=None) -> Path:
    layout = prepare_output(path)
    meta = {"vocabulary": list(labels)} if metadata is None else metadata
    writer = TagTableWriter(layout, list(labels), metadata=meta, all_scores=True)
    count = len(keys)
    writer.write(
        TagBatch(
            keys=keys, sources=keys, errors=[None] * count, tag_counts=np.zeros(count, np.int64),
            tag_labels=np.zeros(0, np.int64), tag_scores=np.zeros(0, np.float32), scores=scores,
        )
    )
    if errors:
        writer.write(TagBatch.from_failures(list(errors), list(errors), list(errors.values())))
    writer.finalize()
    return path


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
    assert sorted(coverage["annotations_not_in_table_examples"]) == sorted(bench.key(n) for n in ("6", "missing", "corrupt"))
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
    read_thresholds(thresholds).for_vocabulary(LABELS, runtime.vocabulary_fingerprint(list(LABELS)), runtime.fingerprint)


# ---------------------------------------------------------------------------------------------
# The command


def test_cli_reports_calibration_round_trip(bench: Bench, runtime, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the 'plots' extra
    report, summary, thresholds = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "t.tsv"
    code, out, err = run_cli(
        bench.args("--unseen", str(bench.unseen), "--json", str(report), "--markdown", str(summary),
                   "--calibrate", str(thresholds), "--plots", str(tmp_path / "plots")),
        capsys,
    )
    assert code == 3, err  # the bench has a missing and a corrupt image
    assert "GZSL" in out and "mAP" in out and "F1@3 (OF1)" in out  # results on stdout
    assert "2 image(s) skipped" in err and PLOTS_SKIPPED in err  # problems on stderr
    data = json.loads(report.read_text())
    assert data["model"]["fingerprint"] == runtime.fingerprint
    assert set(data["protocols"]) == {ZSL, GZSL}
    gzsl = data["protocols"][GZSL]
    assert gzsl["images"]["images"] == 10 and gzsl["images"]["failed"] == 2
    assert [row["label"] for row in gzsl["arms"][MODEL_ARM]["per_label"]] == list(LABELS)
    assert PLOTS_SKIPPED in data["notes"] and PLOTS_SKIPPED in summary.read_text()
    assert "## Results (%)" in summary.read_text()
    # the thresholds file is what `ramtag tag --thresholds` reads, for this vocabulary and model
    loaded = read_thresholds(thresholds).for_vocabulary(LABELS, runtime.vocabulary_fingerprint(list(LABELS)), runtime.fingerprint)
    scores = direct_scores(runtime, bench, GOOD, LABELS)
    fitted = fit_thresholds(scores, multi_hot(GOOD, LABELS))
    np.testing.assert_allclose(loaded, fitted.thresholds.astype(np.float32), rtol=1e-6)
    rows = data["calibration"]["labels"]
    assert [row["precision"] for row in rows] == pytest.approx(fitted.precision.tolist())
    assert [row["recall"] for row in rows] == pytest.approx(fitted.recall.tolist())


def test_cli_target_precision(bench: Bench, tmp_path: Path, capsys):
    report, thresholds = tmp_path / "r.json", tmp_path / "t.tsv"
    code, _, err = run_cli(bench.args("--calibrate", str(thresholds), "--target-precision", "0.6", "--json", str(report)), capsys)
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
        ["eval", str(tmp_path / "gone.json"), "-c", str(bench.checkpoint), "--root", str(tmp_path), "--workers", "0", "--device", "cpu"],
        capsys,
    )
    assert code == 2 and "failed to load" in err


def test_plots_when_matplotlib_is_installed(evaluated, tmp_path: Path):
    pytest.importorskip("matplotlib")
    from ramtag.engine.report import write_plots

    result = evaluated
    outcome = write_plots(result, tmp_path / "plots")
    names = sorted(Path(path).name for path in outcome.files)
    assert names == sorted(f"{p}-{kind}.png" for p in (ZSL, GZSL) for kind in ("ap", "pr", "arms"))
    assert all(Path(path).read_bytes()[:4] == b"\x89PNG" for path in outcome.files)
    assert "![gzsl-ap]" in markdown_summary(result, plots=outcome.files)


def test_report_renderers_agree_with_the_metrics(evaluated):
    result = evaluated
    report = report_dict(result)
    json.dumps(report, allow_nan=False)
    assert report["protocols"][ZSL]["arms"][MODEL_ARM]["metrics"]["mAP"] == result.protocols[ZSL].arms[MODEL_ARM].metrics.mAP
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(results_table(result))
    text = console.export_text()
    assert f"{100 * result.protocols[GZSL].arms[MODEL_ARM].metrics.mAP:.2f}" in text


# ---------------------------------------------------------------------------------------------
# torchrun


@pytest.mark.slow
def test_two_process_run_equals_one_process(bench: Bench, tmp_path: Path):
    """2 CPU ranks on gloo score disjoint shares; rank 0's report equals a single process's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # batch size 1 and one thread each: every image is scored alone, by the same operations, in both runs,
    # so scores are bit-identical and so are the metrics (Sinkhorn's stopping rule looks across a batch)
    common = bench.args("--unseen", str(bench.unseen), "--baseline", "--batch-size", "1", "--quiet")[1:]
    single = tmp_path / "single.json"
    distributed = tmp_path / "dist.json"
    alone = subprocess.run([sys.executable, "-m", "ramtag", "eval", *common, "--json", str(single)], env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 3, alone.stderr[-3000:]  # the bench's missing and corrupt images
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ramtag", "eval",
         *common, "--json", str(distributed)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    # torchrun turns rank 0's status 3 (the bench's missing and corrupt images) into its own failure status
    assert run.returncode != 0 and "could not be evaluated" in run.stderr, run.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(distributed.read_text())
    assert two["configuration"]["world_size"] == 2 and one["configuration"]["world_size"] == 1
    for name in (ZSL, GZSL):
        left, right = one["protocols"][name], two["protocols"][name]
        assert left["images"]["images"] == right["images"]["images"]
        assert left["images"] == right["images"]
        for arm in (MODEL_ARM, TRAINING_FREE_ARM, CLIP_GLOBAL_ARM):
            assert right["arms"][arm] == left["arms"][arm]


def test_a_score_table_that_matches_nothing_suggests_the_prefix_to_strip():
    from ramtag.engine.score_table import _prefix_hint

    assert _prefix_hint(["000001.png", "000002.png"], ["data/images/000002.png"]) == "try --map-prefix 'data/images/='"
    assert _prefix_hint(["sub/000002.png"], ["images/sub/000002.png"]) == "try --map-prefix 'images/='"
    assert _prefix_hint(["a.png"], ["images/b.png"]) is None
