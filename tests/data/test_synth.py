"""The synthetic benchmark: determinism, label/box consistency, every written format, the label split."""

from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from ramtag.data import synth, synth_files
from ramtag.errors import UsageError


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _digest(directory) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synth_files.write_dataset(out, n=7, seed=3, image_size=48, shard_size=3)
    return out, summary


def test_same_seed_gives_identical_pixels_and_different_seed_does_not():
    a = synth.generate_scene(5, 2, 48)
    b = synth.generate_scene(5, 2, 48)
    assert _png(a.image) == _png(b.image)
    assert (a.labels, a.caption, a.boxes) == (b.labels, b.caption, b.boxes)
    assert _png(synth.generate_scene(6, 2, 48).image) != _png(a.image)
    assert _png(synth.generate_scene(5, 3, 48).image) != _png(a.image)


def test_scene_does_not_depend_on_what_was_generated_before():
    later = synth.generate_scene(9, 4, 48)
    for index in range(4):
        synth.generate_scene(9, index, 48)
    assert _png(synth.generate_scene(9, 4, 48).image) == _png(later.image)


def test_written_dataset_is_byte_identical_for_the_same_seed(tmp_path, dataset):
    out, _ = dataset
    again = synth_files.write_dataset(tmp_path / "again", n=7, seed=3, image_size=48, shard_size=3)
    assert _digest(again.out) == _digest(out)


@pytest.mark.parametrize("index", range(12))
def test_labels_boxes_and_pixels_agree(index):
    size = 48
    scene = synth.generate_scene(11, index, size)
    assert scene.image.size == (size, size) and scene.image.mode == "RGB"
    assert 1 <= len(scene.objects) <= synth.MAX_OBJECTS
    expected = {o.shape for o in scene.objects} | {o.colour for o in scene.objects}
    assert set(scene.labels) == expected
    assert list(scene.labels) == sorted(scene.labels, key=synth.ALL_LABELS.index)

    union = np.zeros((size, size), dtype=bool)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        inside = np.zeros((size, size), dtype=bool)
        inside[y0:y1, x0:x1] = True
        assert obj.mask.any()
        assert not (obj.mask & ~inside).any(), "object pixels outside its box"
        union |= inside
    # The rendered image differs from the bare background only inside the objects' boxes
    # (plus the global sensor noise, at most a few grey levels).
    diff = np.abs(np.asarray(scene.image, dtype=int) - np.asarray(scene.background, dtype=int)).max(axis=2)
    assert diff[~union].max() <= 10
    for obj in scene.objects:
        assert diff[obj.mask].mean() > 10


@pytest.mark.parametrize("index", range(6))
def test_objects_are_painted_in_their_colour(index):
    scene = synth.generate_scene(1, index, 64)
    pixels = np.asarray(scene.image, dtype=float)
    for obj in scene.objects:
        # Its most visible pixels are those no later object was drawn over.
        later = [o.mask for o in scene.objects[scene.objects.index(obj) + 1:]]
        visible = obj.mask & ~np.any(later, axis=0) if later else obj.mask
        mean = np.median(pixels[visible], axis=0)
        nearest = min(synth.COLOURS, key=lambda c: np.linalg.norm(np.asarray(synth.COLOURS[c]) - mean))
        assert nearest == obj.colour


def test_caption_names_every_object():
    scene = synth.generate_scene(4, 1, 48)
    for obj in scene.objects:
        assert f"{obj.colour} {obj.shape}" in scene.caption
    assert scene.caption.startswith("a photo of ")


def test_caption_styles():
    objects = [("red", "star"), ("orange", "ring"), ("red", "circle")]
    assert synth.describe(objects) == "a photo of a red star, an orange ring and a red circle."
    assert synth.describe(objects, "shapes") == "a photo of a star, a ring and a circle."
    assert synth.describe(objects, "colours") == "a photo of a red and an orange."
    single = synth.describe(objects, "label", rng=np.random.default_rng(0))
    assert re.fullmatch(r"a photo of an? (red|orange|star|ring|circle)\.", single)
    with pytest.raises(UsageError):
        synth.describe(objects, "haiku")


def test_label_split():
    seen, unseen = set(synth.SEEN_LABELS), set(synth.UNSEEN_LABELS)
    assert seen and unseen and not seen & unseen
    assert seen | unseen == set(synth.SHAPES) | set(synth.COLOURS)
    assert list(synth.ALL_LABELS) == list(synth.SEEN_LABELS) + list(synth.UNSEEN_LABELS)
    # Unseen words are absent from the seen vocabulary but the captions (CLIP pretraining text) use them.
    caption_words: set[str] = set()
    for index in range(60):
        caption_words |= set(re.findall(r"[a-z]+", synth.generate_scene(2, index, 32).caption))
    assert unseen <= caption_words


def test_vocab_files(dataset):
    out, _ = dataset
    read = lambda name: (out / name).read_text().splitlines()  # noqa: E731
    assert read("seen.txt") == list(synth.SEEN_LABELS)
    assert read("unseen.txt") == list(synth.UNSEEN_LABELS)
    assert read("all.txt") == list(synth.ALL_LABELS)
    assert not set(read("seen.txt")) & set(read("unseen.txt"))


def test_reference_json_loads(dataset):
    out, summary = dataset
    doc = json.loads((out / "labels.json").read_text())
    assert doc["classes"] == list(synth.ALL_LABELS)
    assert len(doc["images"]) == summary.n
    for (path, labels), index in zip(doc["images"], range(summary.n)):
        scene = synth.generate_scene(3, index, 48)
        assert labels == list(scene.labels)
        with Image.open(out / path) as image:
            assert np.array_equal(np.asarray(image), np.asarray(scene.image))
    seen = json.loads((out / "seen.json").read_text())
    unseen = json.loads((out / "unseen.json").read_text())
    assert seen["classes"] == list(synth.SEEN_LABELS) and unseen["classes"] == list(synth.UNSEEN_LABELS)
    for (_, all_labels), (_, s), (_, u) in zip(doc["images"], seen["images"], unseen["images"]):
        assert set(s) <= set(synth.SEEN_LABELS) and set(u) <= set(synth.UNSEEN_LABELS)
        assert set(s) | set(u) == set(all_labels)


def test_jsonl_manifest_and_boxes(dataset):
    out, summary = dataset
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == summary.n
    boxes = json.loads((out / "boxes.json").read_text())
    for line in lines:
        row = json.loads(line)
        assert (out / row["image"]).is_file()
        assert row["boxes"] == boxes["images"][row["image"]]
        assert {b["shape"] for b in row["boxes"]} | {b["colour"] for b in row["boxes"]} == set(row["labels"])
    counted = {label: sum(label in json.loads(line)["labels"] for line in lines) for label in synth.ALL_LABELS}
    assert counted == summary.label_counts


def test_webdataset_shards_iterate_with_labels(dataset):
    import webdataset as wds

    out, summary = dataset
    shards = sorted((out / "shards").glob("*.tar"))
    assert len(shards) == 3  # 7 samples, 3 per shard
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(summary.n)]
    for sample, row in zip(samples, manifest):
        assert sample["json"]["labels"] == row["labels"]
        assert sample["json"]["boxes"] == row["boxes"]
        indices = [int(t) for t in sample["idx"].split()]
        assert [synth.ALL_LABELS[i] for i in indices] == row["labels"]
        with Image.open(out / row["image"]) as image:
            assert np.array_equal(np.asarray(sample["png"].convert("RGB")), np.asarray(image))


def test_formats_can_be_chosen(tmp_path):
    summary = synth_files.write_dataset(tmp_path, n=2, seed=0, image_size=32, formats={"webdataset"})
    assert (tmp_path / "shards").is_dir() and not (tmp_path / "images").exists()
    assert not (tmp_path / "labels.json").exists() and "jsonl" not in summary.files
    with pytest.raises(UsageError):
        synth_files.write_dataset(tmp_path, n=2, seed=0, formats={"parquet"})
    with pytest.raises(UsageError):
        synth_files.write_dataset(tmp_path, n=0, seed=0)


def test_a_palette_limits_colours_and_keeps_everything_else_of_the_scene():
    restricted = [synth.generate_scene(4, i, 48, palette=("red", "blue")) for i in range(20)]
    assert {o.colour for s in restricted for o in s.objects} <= {"red", "blue"}
    # The palette replaces only the colour draw: positions and shapes come from the same random stream.
    free = synth.generate_scene(4, 0, 48)
    assert [o.shape for o in restricted[0].objects] == [o.shape for o in free.objects]
    assert _png(synth.generate_scene(4, 0, 48, palette=list(synth.COLOURS)).image) == _png(free.image)


def test_bad_arguments_raise_typed_errors():
    with pytest.raises(UsageError):
        synth.generate_scene(0, 0, palette=["mauve"])
    with pytest.raises(UsageError):
        synth.generate_scene(0, 0, palette=[])
    with pytest.raises(UsageError):
        synth.generate_scene(0, 0, size=8)
    with pytest.raises(UsageError):
        synth.generate_scene(-1, 0)


def test_examples_are_regenerated_identically(tmp_path):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "examples"
    if not (shipped / "vocab.txt").exists():
        pytest.skip("examples/ not generated in this checkout")
    for path in synth_files.write_examples(tmp_path):
        assert path.read_bytes() == (shipped / path.name).read_bytes(), path.name
