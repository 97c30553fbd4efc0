"""ramtag.engine.eval.model: protocols and their image sets, baselines, and torchrun runs equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ramtag.engine.eval.model import evaluate_model
from ramtag.engine.eval.types import CLIP_GLOBAL_ARM, GZSL, MODEL_ARM, MULTILABEL, TRAINING_FREE_ARM, ZSL
from ramtag.engine.runtime import load_runtime
from ramtag.metrics import evaluate_scores
from tests.eval_fixtures import (
    GOOD,
    LABELS,
    SCORE_TOLERANCE,
    UNSEEN,
    Bench,
    direct_scores,
    multi_hot,
)

# ---------------------------------------------------------------------------------------------
# Protocols


def test_zsl_and_gzsl_sets_and_scores(bench: Bench, runtime, evaluated):
    assert list(evaluated.protocols) == [ZSL, GZSL]
    zsl, gzsl = evaluated.protocols[ZSL], evaluated.protocols[GZSL]
    # ZSL: the decodable images with at least one unseen label, scored over the unseen labels only
    zsl_names = ["0", "3", "5", "7"]
    assert zsl.keys == [bench.key(name) for name in zsl_names]
    assert zsl.labels == UNSEEN
    assert zsl.targets.tolist() == [[1, 0], [0, 1], [1, 1], [0, 1]]
    assert sorted(key for key, _ in zsl.tally.failed) == [bench.key("corrupt"), bench.key("missing")]
    zsl_scores = direct_scores(runtime, bench, zsl_names, UNSEEN)
    np.testing.assert_allclose(zsl.arms[MODEL_ARM].scores, zsl_scores, atol=SCORE_TOLERANCE)
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
        free_scores = direct_scores(free, bench, names, labels)
        np.testing.assert_allclose(arms[TRAINING_FREE_ARM].scores, free_scores, atol=SCORE_TOLERANCE)
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


# ---------------------------------------------------------------------------------------------
# torchrun


@pytest.mark.slow
def test_two_process_run_equals_one_process(bench: Bench, tmp_path: Path):
    """2 CPU ranks on gloo score disjoint shares; rank 0's report equals a single process's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    # batch size 1 and one thread each: every image is scored alone, by the same operations, in both runs,
    # so scores are bit-identical and so are the metrics (Sinkhorn's stopping rule looks across a batch)
    common = bench.args("--unseen", str(bench.unseen), "--baseline", "--batch-size", "1", "--quiet")[1:]
    single = tmp_path / "single.json"
    distributed = tmp_path / "dist.json"
    alone = subprocess.run(
        [sys.executable, "-m", "ramtag", "eval", *common, "--json", str(single)],
        env=env, capture_output=True, text=True, timeout=300,
    )
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
