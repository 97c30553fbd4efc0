"""What a short CPU training run adds on the demo backbone, measured on held-out synthetic scenes.

Issue 5 asks that a short run beat training-free RAM *and* CLIP global scoring on ZSL, GZSL and seen labels.
It does not, on this demo; the README ("Training on the demo") says what holds and why, and
`benchmarks/train_demo.py` measures it on five seed pairs. On those five, training the adapters alone
(`--adapter-tokens 0 --prompt-tokens 0`) lifts the local branch's GZSL mAP on every pair (+3.0 to +5.5
points) and the fused GZSL and seen mAP over training-free RAM on every pair (+2.0 to +3.1, +2.6 to +3.9).
Against CLIP global it is level on GZSL and seen (-0.2 to +1.0) and below it on ZSL on every pair (-0.5 to
-2.4): the demo's local branch is 8 to 15 points below its global branch on unseen labels, and training on 15
seen labels does not carry over to the 5 unseen ones. With the reference recipe's prompts and adapter tokens
the global branch gets worse and the run ends below both baselines everywhere.

This test runs the first of those seed pairs (train 21, held-out 12) and asserts what it measured there, for
the EMA and the live weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.demo_study import arm_scores
from ramtag.engine.runtime import load_runtime
from ramtag.metrics import mean_average_precision
from tests.io_fixtures import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-demo")
    formats = ("--format", "images", "--format", "json")
    assert run_cli("data", "synth", root / "train", "--n", 512, "--seed", 21, *formats) == 0
    assert run_cli("data", "synth", root / "val", "--n", 200, "--seed", 12, *formats) == 0
    run = root / "run"
    assert run_cli(
        "train", root / "train" / "seen.json", "--root", root / "train", "--model", "demo", "-o", run,
        "--batch-size", 32, "--epochs", 4, "--schedule", "cosine", "--adapter-lr", 3e-3,
        "--adapter-tokens", 0, "--prompt-tokens", 0,
        "--workers", 0, "--seed", 42,
    ) == 0
    results = {}
    for name, checkpoint in (("ema", run / "checkpoint.safetensors"), ("live", run / "checkpoint-live.safetensors")):
        report = root / f"{name}.json"
        assert run_cli(
            "eval", root / "val" / "labels.json", "--root", root / "val", "--checkpoint", checkpoint,
            "--labels", root / "val" / "all.txt", "--unseen", root / "val" / "unseen.txt", "--baseline",
            "--workers", 0, "--json", report,
        ) == 0
        results[name] = json.loads(report.read_text())["protocols"]
    # The same local temperature rule on both sides (a checkpoint's, the reference's fixed τ_loc): the figures
    # compare training, not the demo's default `matched` rule against it.
    untrained = {"model": "demo", "overrides": {"local_temperature": "fixed"}}
    sources = (("training_free", untrained), ("trained", {"checkpoint": run / "checkpoint.safetensors"}))
    results["local_gzsl"] = {
        name: _local_branch_map(load_runtime(device="cpu", **source), root / "val") for name, source in sources
    }
    return results


def _local_branch_map(runtime, folder) -> float:
    """GZSL mAP of the KCOT local branch's scores alone."""
    data = json.loads((folder / "labels.json").read_text())["images"]
    vocabulary = [label for label in (folder / "all.txt").read_text().split("\n") if label]
    transform = runtime.transform()
    images = torch.stack([transform(Image.open(folder / path).convert("RGB")) for path, _ in data])
    scores = arm_scores(runtime, images, vocabulary)["ram_local"]
    targets = np.array([[label in labels for label in vocabulary] for _, labels in data], dtype=np.float32)
    return mean_average_precision(scores, targets)[0]


def test_training_lifts_the_local_branch(trained):
    # measured on this pair: 0.568 -> 0.617; on the five pairs of benchmarks/train_demo.py, +0.030 to +0.055.
    assert trained["local_gzsl"]["trained"] > trained["local_gzsl"]["training_free"] + 0.03, trained["local_gzsl"]


def _maps(protocols: dict, arm: str) -> dict[str, float]:
    gzsl = protocols["gzsl"]["arms"][arm]["metrics"]
    return {"zsl": protocols["zsl"]["arms"][arm]["metrics"]["mAP"], "gzsl": gzsl["mAP"], "seen": gzsl["mAP_seen"]}


@pytest.mark.parametrize("weights", ["ema", "live"])
def test_short_training_beats_both_baselines_except_clip_global_on_unseen_labels(trained, weights):
    model = _maps(trained[weights], "model")
    training_free = _maps(trained[weights], "training_free")
    clip_global = _maps(trained[weights], "clip_global")
    # measured (EMA; live within 0.001): trained / training-free RAM / CLIP global
    #   GZSL 0.730 / 0.709 / 0.723, seen 0.739 / 0.712 / 0.733, ZSL 0.767 / 0.763 / 0.778.
    # The beats over CLIP global (GZSL, seen) and over training-free RAM on ZSL hold on this pair, not on every
    # pair: over five, CLIP global wins GZSL once and seen labels twice, and training-free RAM wins ZSL twice.
    for protocol in ("gzsl", "seen"):
        assert model[protocol] > training_free[protocol] + 0.01, (protocol, model, training_free)
        assert model[protocol] > clip_global[protocol] + 0.002, (protocol, model, clip_global)
    assert model["zsl"] > training_free["zsl"] + 0.001, (model, training_free)
