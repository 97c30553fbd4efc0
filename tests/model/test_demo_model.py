"""The bundled demo model on the synthetic benchmark (issue 4's measured claims) and the README's tour.

Figures were measured with the seeds below (see benchmarks/demo_vocabulary.py for the larger run); the
margins leave room for platform differences in floating point, not for a different outcome.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.demo_study import map_peak_hits, synthetic_images, zero_shot_report
from ramtag.engine.runtime import load_runtime
from tests.io_fixtures import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    runtime = load_runtime(model="demo", device="cpu")
    return runtime, synthetic_images(runtime, 100, seed=7)


@pytest.fixture(scope="module")
def report(demo):
    return zero_shot_report(*demo)


def test_zero_shot_on_unseen_labels_is_far_above_chance(report):
    # measured: unseen labels RAM 0.57, CLIP global 0.56, chance 0.20; all labels 0.70 / 0.70, chance 0.20
    for arm in ("ram", "clip_global"):
        assert report[arm]["unseen"] > report["chance"]["unseen"] + 0.25
        assert report[arm]["all"] > report["chance"]["all"] + 0.35


def test_the_demo_recognises_shapes_not_only_colours(report):
    """The first demo knew colours only (shape mAP at chance); the shipped one must know both."""
    # measured: shapes RAM 0.51, CLIP global 0.52, RAM local 0.41, chance 0.18; colours 0.97 / 0.97 / 0.91, chance 0.24
    for arm in ("ram", "clip_global"):
        assert report[arm]["shapes"] > report["chance"]["shapes"] + 0.25
        assert report[arm]["colours"] > report["chance"]["colours"] + 0.6
    assert report["ram_local"]["shapes"] > report["chance"]["shapes"] + 0.15


def test_region_maps_peak_inside_the_objects(demo):
    runtime, data = demo
    hits = map_peak_hits(runtime, data)
    # measured: colours 0.97 of peaks inside the object's box (chance 0.17), shapes 0.72 (chance 0.16)
    assert hits["colour"]["hit_rate"] > 5 * hits["colour"]["chance"]
    assert hits["shape"]["hit_rate"] > 3.5 * hits["shape"]["chance"]


def test_readme_first_command_names_the_objects_in_the_examples(capsys):
    from ramtag.data.synth import SHAPES

    assert (
        run_cli(
            "tag",
            ROOT / "examples",
            "--labels",
            ROOT / "examples" / "vocab.txt",
            "--model",
            "demo",
            "-o",
            "-",
            "-q",
            "--workers",
            0,
        )
        == 0
    )
    rows = {row["key"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    truth = {
        row["image"]: set(row["labels"])
        for row in map(json.loads, (ROOT / "examples" / "labels.jsonl").read_text().splitlines())
    }
    assert set(rows) == set(truth) and len(rows) == 12
    top = {key: [tag["label"] for tag in row["tags"]] for key, row in rows.items()}
    # measured: the top tag is true in 10 of 12; a true shape is among the top three in 11 of 12
    # (img12's white cross is read as a hexagon or a circle); a true label is among the top two in 11 of 12
    # (img12's white is third). The fixed local temperature had all 12 there, but over 400 scenes the demo's
    # matched rule puts a true label in the top two more often (0.98 against 0.96; benchmarks/vocab_size.py).
    assert sum(tags[0] in truth[key] for key, tags in top.items()) >= 10
    assert sum(bool(set(tags[:3]) & truth[key] & set(SHAPES)) for key, tags in top.items()) >= 11
    assert sum(bool(set(tags[:2]) & truth[key]) for tags, key in zip(top.values(), top)) >= 11
    for key, tags in top.items():
        assert set(tags[:3]) & truth[key], f"{key}: top three {tags[:3]} share nothing with {truth[key]}"


def test_a_small_vocabulary_ranks_the_labels_each_image_shows(tmp_path, capsys):
    """Issue 16's first experiment: with red, blue and "green circle", the reference's fixed local temperature
    made the local branch one-hot on "green circle" for almost every image (0.500 everywhere, the red triangle
    included). Every image showing red or blue, not both, must now put that colour first."""
    (tmp_path / "vocab.txt").write_text("red\nblue\ngreen circle\n")
    argv = ["tag", ROOT / "examples", "--labels", tmp_path / "vocab.txt", "--model", "demo", "-o", "-", "-q",
            "--workers", 0]
    assert run_cli(*argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    truth = {
        row["image"]: set(row["labels"])
        for row in map(json.loads, (ROOT / "examples" / "labels.jsonl").read_text().splitlines())
    }
    tops = {row["key"]: row["tags"][0] for row in rows}
    shown = {key: {"red", "blue"} & labels for key, labels in truth.items()}
    checked = [key for key, colours in shown.items() if len(colours) == 1]
    assert len(checked) >= 5
    for key in checked:
        assert tops[key]["label"] in shown[key], f"{key}: {tops[key]} first, but it shows {shown[key]}"
    assert len({top["label"] for top in tops.values()}) == 3  # no label wins everywhere


def test_the_fixed_local_temperature_saturates_a_small_vocabulary_and_matched_does_not():
    """Why: the plan gives each label 1/C of the mass, so the local logit scales with 1/(C·τ_loc)."""
    import torch

    from ramtag.data.images import decode_image

    images = None
    for rule in ("fixed", "matched"):
        runtime = load_runtime(model="demo", device="cpu", overrides={"local_temperature": rule})
        if images is None:
            transform = runtime.transform()
            images = torch.stack([transform(decode_image(p)) for p in sorted((ROOT / "examples").glob("*.png"))])
        with torch.no_grad():
            out = runtime.score(images, runtime.encode_labels(["red", "blue", "green circle"]))
        saturated = (out.local_scores.max(dim=1).values > 0.99).float().mean().item()
        # measured: fixed 12 of 12 images one-hot; matched, the demo's default, none
        assert (saturated > 0.9) if rule == "fixed" else (saturated == 0.0), (rule, saturated)
    assert load_runtime(model="demo", device="cpu").config.local_temperature == "matched"


@pytest.mark.slow
def test_readme_tour_runs(tmp_path, monkeypatch):
    """The README's five-minute tour, command by command, in a scratch folder."""
    from tests.test_readme import ramtag_arguments, readme_commands

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    tour = [
        c
        for c in readme_commands()
        if ramtag_arguments(c) is not None and "torchrun" not in c and "srun" not in c and "weights/" not in c
    ]
    ran = 0
    for command in tour:
        arguments = ramtag_arguments(command)
        if arguments[0] == "model" or "nus_wide.pth" in command:
            continue  # needs network or the reference's weights: checked for syntax in test_readme
        if arguments[0] == "tag" and "--model demo" not in command:
            continue  # the user's data and ViT-B weights (Hub tables, buckets, clusters): syntax checked there too
        if arguments[0] in ("tag", "explain", "train", "eval", "vocab"):
            arguments = [*arguments, *(["--workers", "0"] if arguments[0] in ("tag", "train", "eval") else [])]
        status = run_cli(*arguments)
        assert status == 0, f"`{command}` exited {status}"
        ran += 1
    assert ran >= 8
    assert (tmp_path / "tags.parquet").is_file() and (tmp_path / "vocab.rtv").is_file()
    assert len(list((tmp_path / "maps").glob("*.png"))) == 12


def test_rebuilt_demo_weights_never_reuse_cached_label_features(tmp_path, monkeypatch):
    """The feature cache is keyed by the model fingerprint: it must change when the weights file changes."""
    from safetensors.torch import load_file, save_file

    from ramtag.model.weights import demo_asset_dir

    original = load_runtime(model="demo", device="cpu").fingerprint
    copy = tmp_path / "demo"
    copy.mkdir()
    shutil.copy(demo_asset_dir() / "demo-clip.json", copy / "demo-clip.json")
    weights = load_file(str(demo_asset_dir() / "demo-clip.safetensors"))
    weights["logit_scale"] = weights["logit_scale"] + 0.5
    save_file(weights, str(copy / "demo-clip.safetensors"))
    monkeypatch.setenv("RAMTAG_DEMO_DIR", str(copy))
    assert load_runtime(model="demo", device="cpu").fingerprint != original
