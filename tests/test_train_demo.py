"""What a short CPU training run adds on the demo backbone, measured on held-out synthetic scenes.

Issue 5 asks that a short run beat training-free RAM *and* CLIP global scoring; on the demo it beats the
first and only ties the second (README, "The demo model"). This test guards the part that holds: training the
adapters (deep prompts and adapter tokens frozen, `--token-lr 0`) raises held-out ZSL, GZSL and seen-label
mAP over training-free RAM, for the EMA and the live weights. Trained with the reference recipe's token
rate, prompts and adapter tokens make the global branch worse and the run ends below training-free RAM.
"""

from __future__ import annotations

import json

import pytest

from tests.test_tag import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-demo")
    assert run_cli("data", "synth", root / "train", "--n", 512, "--seed", 21, "--format", "images", "--format", "json") == 0
    assert run_cli("data", "synth", root / "val", "--n", 200, "--seed", 12, "--format", "images", "--format", "json") == 0
    run = root / "run"
    assert run_cli(
        "train", root / "train" / "seen.json", "--root", root / "train", "--model", "demo", "-o", run,
        "--batch-size", 32, "--epochs", 4, "--schedule", "cosine", "--adapter-lr", 3e-3, "--token-lr", 0,
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
    return results


def _maps(protocols: dict, arm: str) -> dict[str, float]:
    gzsl = protocols["gzsl"]["arms"][arm]["metrics"]
    return {"zsl": protocols["zsl"]["arms"][arm]["metrics"]["mAP"], "gzsl": gzsl["mAP"], "seen": gzsl["mAP_seen"]}


@pytest.mark.parametrize("weights", ["ema", "live"])
def test_short_training_beats_training_free_ram_on_held_out_scenes(trained, weights):
    model = _maps(trained[weights], "model")
    training_free = _maps(trained[weights], "training_free")
    # measured (EMA; live within 0.0001): ZSL 0.779 vs 0.763, GZSL 0.720 vs 0.709, seen 0.730 vs 0.712;
    # CLIP global 0.778 / 0.723 / 0.733, which training only ties. The margin is a third of the smallest gain.
    for protocol in ("zsl", "gzsl", "seen"):
        assert model[protocol] > training_free[protocol] + 0.005, (protocol, model, training_free)
