"""scripts/build_demo_model.py: a tiny build runs, resumes to the same weights, and exports a loadable demo."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ramtag.data import synth

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_demo_model.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_demo_model"] = module
    spec.loader.exec_module(module)
    return module


def tiny(build, tmp: Path, name: str):
    return build.BuildConfig(
        image_size=32, patch_size=8, vision_layers=1, vision_width=64, text_layers=1, text_width=64,
        embed_dim=32, steps=4, batch_size=6, warmup_steps=1, eval_images=12, threads=1,
        checkpoint_every_s=1e9, snapshot_every=2, out=tmp / name / "out", work=tmp / name / "work",
    )


def test_every_object_owns_patches_it_mostly_covers(build):
    scenes = [synth.generate_scene(3, i, 64) for i in range(20)]
    phrases, owners = build.object_patches(scenes, 8)
    assert len(phrases) == sum(len(s.objects) for s in scenes) == int(owners.max()) + 1
    first = 0
    for scene, grid in zip(scenes, owners):
        for k, obj in enumerate(scene.objects):
            cover = obj.mask.reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel()
            mine = (grid == first + k).numpy()
            assert mine.any(), f"{obj.shape} owns no patch"
            assert mine.sum() == 1 or cover[mine].min() >= 0.4
            assert phrases[first + k] == synth.describe([obj])
        first += len(scene.objects)


def test_equal_phrases_are_one_class_in_the_region_loss(build):
    torch.manual_seed(0)
    regions = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    owners = torch.tensor([[0, 0, 1, -1], [2, 2, -1, -1]])
    tokens = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 5, 2]])  # objects 0 and 2 have the same phrase
    features = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    distinct, phrase_class = torch.unique(tokens, dim=0, return_inverse=True)
    assert distinct.tolist() == [[1, 5, 2], [1, 6, 2]] and phrase_class.tolist() == [0, 1, 0]
    loss = build.region_phrase_loss(regions, owners, features[[0, 1]], phrase_class, torch.tensor(10.0))
    objects = torch.nn.functional.normalize(
        torch.stack([regions[0, :2].sum(0), regions[0, 2], regions[1, :2].sum(0)]), dim=-1
    )
    logits = 10 * objects @ features[[0, 1]].T  # two distinct phrases, in torch.unique's sorted order
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0]))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_shared_palette_batches_use_two_colours_at_the_asked_rate(build, tmp_path):
    config = tiny(build, tmp_path, "palette")
    palettes = [build.batch_palette(config, step) for step in range(200)]
    assert sum(p is not None for p in palettes) == 100
    assert all(len(set(p)) == 2 and set(p) <= set(synth.COLOURS) for p in palettes if p)


def test_a_resumed_build_ends_with_the_same_weights_and_exports_a_loadable_demo(build, tmp_path, monkeypatch, capsys):
    straight = tiny(build, tmp_path, "straight")
    build.train(straight)
    resumed = tiny(build, tmp_path, "resumed")
    resumed.work.mkdir(parents=True)
    shutil.copy(straight.work / "step-2.pt", resumed.work / "last.pt")  # as if stopped after step 2
    capsys.readouterr()
    build.train(resumed)
    assert "resumed at step 2" in capsys.readouterr().out
    a = load_file(str(straight.out / "demo-clip.safetensors"))
    b = load_file(str(resumed.out / "demo-clip.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    from ramtag.engine.runtime import load_runtime

    monkeypatch.setenv("RAMTAG_DEMO_DIR", str(straight.out))
    runtime = load_runtime(model="demo", device="cpu")
    assert runtime.config.preprocessing.image_size == 32
    image = runtime.transform()(synth.generate_scene(0, 0, 32).image)
    out = runtime.score(image[None], runtime.encode_labels(["red", "star"]))
    assert np.allclose(out.scores.sum(-1).numpy(), 1.0, atol=1e-5)
