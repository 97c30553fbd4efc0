"""ramtag.data.labelled: every DATA format to (image, multi-hot, key), label spaces, ZSL/GZSL sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from ramtag.data.labelled import LabelledItem, open_labelled_source, resolve_label_space, sample_key
from ramtag.data.labelled_samples import LabelTally, checked_batches, collate_labelled, labelled_dataset, select_items
from ramtag.errors import DataError, UsageError, VocabularyError
from tests.io_fixtures import image_bytes, write_image, write_shard

CLASSES = ["cat", "dog", "car", "boat"]


def to_tensor(image) -> torch.Tensor:
    """A stand-in for a model transform (training passes its augmentation the same way)."""
    return torch.tensor(image.size, dtype=torch.float32)


def read_all(dataset, batch_size: int = 3, workers: int = 0):
    """Every good sample as {key: (image, target)}, plus the tally of the pass."""
    tally = LabelTally()
    found = {}
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_labelled)
    for batch in checked_batches(loader):
        tally.update(batch)
        for index, key in enumerate(batch.keys):
            assert key not in found
            found[key] = (batch.images[index], batch.targets[index].tolist())
    return found, tally


@pytest.fixture()
def reference_file(tmp_path: Path) -> Path:
    """Reference-format JSON with another machine's absolute paths, a missing and a corrupt image."""
    for index in range(3):
        write_image(tmp_path / "images" / f"{index}.png", seed=index)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not an image")
    prefix = "/mnt/nas/someone/COCO"
    document = {
        "images": [
            [f"{prefix}/images/0.png", ["cat", "car", "cat"]],
            [f"{prefix}/images/1.png", ["dog", "zebra"]],
            [f"{prefix}/images/2.png", []],
            [f"{prefix}/images/missing.png", ["boat"]],
            [f"{prefix}/images/corrupt.png", ["boat", "cat"]],
        ],
        "classes": CLASSES,
    }
    path = tmp_path / "test.json"
    path.write_text(json.dumps(document))
    return path


def test_reference_json_with_prefix_mapping_yields_images_targets_and_keys(reference_file: Path, tmp_path: Path):
    source = open_labelled_source(str(reference_file), root=tmp_path, prefix_map=["/mnt/nas/someone/COCO="])
    assert source.classes == tuple(CLASSES)
    assert [item.key for item in source.items][:2] == ["images/0.png", "images/1.png"]
    assert source.items[0].path == str(tmp_path / "images" / "0.png")
    dataset = labelled_dataset(source, CLASSES, to_tensor)
    found, tally = read_all(dataset)
    assert set(found) == {"images/0.png", "images/1.png", "images/2.png"}
    assert found["images/0.png"][1] == [1.0, 0.0, 1.0, 0.0]  # the repeated 'cat' counts once
    assert found["images/1.png"][1] == [0.0, 1.0, 0.0, 0.0]  # 'zebra' is outside the label space
    assert found["images/2.png"][1] == [0.0, 0.0, 0.0, 0.0]  # no label: a negative for every class
    assert found["images/0.png"][0].tolist() == [16.0, 16.0]  # the transform was applied
    assert tally.images == 3
    assert sorted(key for key, _ in tally.failed) == ["images/corrupt.png", "images/missing.png"]
    assert dict(tally.dropped) == {"zebra": 1}
    assert tally.images_without_labels == 1
    assert any("2 image(s) skipped" in message for message in tally.messages())


def test_absolute_paths_under_root_become_relative_keys(tmp_path: Path):
    write_image(tmp_path / "a" / "x.png", seed=1)
    path = tmp_path / "abs.jsonl"
    path.write_text(json.dumps({"image": str(tmp_path / "a" / "x.png"), "labels": ["cat"]}) + "\n")
    source = open_labelled_source([str(path)], root=tmp_path)
    assert source.items == (LabelledItem("a/x.png", str(tmp_path / "a" / "x.png"), ("cat",)),)


def test_strict_labels_refuse_labels_outside_the_space(reference_file: Path, tmp_path: Path):
    source = open_labelled_source(str(reference_file), root=tmp_path, prefix_map=["/mnt/nas/someone/COCO="])
    with pytest.raises(DataError, match="zebra"):
        labelled_dataset(source, CLASSES, to_tensor, strict=True)


def test_jsonl_manifest_and_union_label_space(tmp_path: Path):
    write_image(tmp_path / "p" / "a.png", seed=3)
    write_image(tmp_path / "p" / "b.png", seed=4)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"image": "p/a.png", "labels": ["tree", "sky"]}) + "\n"
        + json.dumps({"image": "p/b.png", "labels": ["sky"]}) + "\n"
    )
    source = open_labelled_source(str(manifest), root=tmp_path)
    space = resolve_label_space(source)
    assert space.labels == ("tree", "sky") and space.origin.startswith("labels found")
    found, _ = read_all(labelled_dataset(source, space.labels, to_tensor))
    assert found["p/a.png"][1] == [1.0, 1.0] and found["p/b.png"][1] == [0.0, 1.0]


def test_coco_instances(tmp_path: Path):
    write_image(tmp_path / "val" / "1.png", seed=5)
    write_image(tmp_path / "val" / "2.png", seed=6)
    coco = {
        "images": [{"id": 1, "file_name": "val/1.png"}, {"id": 2, "file_name": "val/2.png"}],
        "annotations": [
            {"image_id": 1, "category_id": 18},
            {"image_id": 1, "category_id": 18},
            {"image_id": 1, "category_id": 3},
        ],
        "categories": [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    source = open_labelled_source(str(path), root=tmp_path)
    space = resolve_label_space(source)
    assert space.labels == ("car", "dog")
    found, tally = read_all(labelled_dataset(source, space.labels, to_tensor))
    assert found["val/1.png"][1] == [1.0, 1.0]
    assert found["val/2.png"][1] == [0.0, 0.0]
    assert tally.images_without_labels == 1


def K(shard: str, key: str) -> str:
    """The row key of a sample of the test shards (``ramtag tag`` keys shard samples the same way)."""
    return sample_key(f"shards/{shard}.tar", key)


def _labelled_shards(tmp_path: Path) -> list[str]:
    first = write_shard(
        tmp_path / "shards" / "s0.tar",
        [
            ("a", {"png": image_bytes(1), "json": json.dumps(["cat", "car"]).encode()}),
            ("b", {"png": image_bytes(2), "txt": b"dog\nzebra\n"}),
            ("c", {"png": image_bytes(3)}),  # no label member
        ],
    )
    second = write_shard(
        tmp_path / "shards" / "s1.tar",
        [
            ("d", {"png": image_bytes(4), "cls": b"3 0"}),  # boat, cat by index into the label list
            ("e", {"png": b"broken", "json": json.dumps({"labels": ["boat"]}).encode()}),
        ],
    )
    return [str(first), str(second)]


def test_webdataset_shards_with_json_txt_and_cls_labels(tmp_path: Path):
    shards = _labelled_shards(tmp_path)
    source = open_labelled_source(shards)
    assert source.is_shards
    found, tally = read_all(labelled_dataset(source, CLASSES, to_tensor))
    assert found[K("s0", "a")][1] == [1.0, 0.0, 1.0, 0.0]
    assert found[K("s0", "b")][1] == [0.0, 1.0, 0.0, 0.0]
    assert found[K("s1", "d")][1] == [1.0, 0.0, 0.0, 1.0]
    assert dict(tally.failed) == {
        K("s0", "c"): "no label member (.json, .txt or .cls) in sample",
        K("s1", "e"): "not an image",
    }
    assert dict(tally.dropped) == {"zebra": 1}


def test_shard_pattern_and_zsl_filter_before_decoding(tmp_path: Path):
    _labelled_shards(tmp_path)
    source = open_labelled_source([str(tmp_path / "shards" / "s{0..1}.tar")])
    assert len(source.shards) == 2
    dataset = labelled_dataset(source, ["car", "boat"], to_tensor, label_space=CLASSES, require_any=["car", "boat"])
    found, tally = read_all(dataset)
    assert set(found) == {K("s0", "a"), K("s1", "d")}
    assert found[K("s0", "a")][1] == [1.0, 0.0] and found[K("s1", "d")][1] == [0.0, 1.0]
    # s1/e (boat) is selected but broken; s0/c has no labels, so it cannot be selected or refused
    assert sorted(key for key, _ in tally.failed) == [K("s0", "c"), K("s1", "e")]


def test_shard_labels_without_decoding_for_score_table_joins(tmp_path: Path):
    source = open_labelled_source(_labelled_shards(tmp_path))
    items = source.labelled_items(CLASSES)
    assert [(item.key, item.labels) for item in items] == [
        (K("s0", "a"), ("cat", "car")),
        (K("s0", "b"), ("dog", "zebra")),
        (K("s1", "d"), ("boat", "cat")),
        (K("s1", "e"), ("boat",)),
    ]  # s0/c has no label member, so it cannot be evaluated


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_strict_labels_and_cls_without_label_list(tmp_path: Path, workers: int):
    source = open_labelled_source(_labelled_shards(tmp_path))
    with pytest.raises(DataError, match="zebra") as refused:
        read_all(labelled_dataset(source, CLASSES, to_tensor, strict=True), workers=workers)
    # From a DataLoader worker too, the error keeps its type and its one-line message: no worker traceback.
    assert type(refused.value) is DataError
    assert "Traceback" not in str(refused.value) and "\n" not in str(refused.value)
    assert str(refused.value).startswith(K("s0", "b"))
    with pytest.raises(UsageError, match="--labels"):
        resolve_label_space(source)  # the union needs the .cls label list


def test_shards_split_by_rank_and_worker_cover_every_sample_once(tmp_path: Path):
    source = open_labelled_source(_labelled_shards(tmp_path))
    keys = []
    for rank in range(2):
        found, tally = read_all(labelled_dataset(source, CLASSES, to_tensor, rank=rank, world_size=2), workers=2)
        keys += list(found) + [key for key, _ in tally.failed]
    assert sorted(keys) == [K("s0", "a"), K("s0", "b"), K("s0", "c"), K("s1", "d"), K("s1", "e")]


def test_files_split_by_rank_are_disjoint_and_keep_their_order(reference_file: Path, tmp_path: Path):
    source = open_labelled_source(str(reference_file), root=tmp_path, prefix_map=["/mnt/nas/someone/COCO="])
    shares = [labelled_dataset(source, CLASSES, to_tensor, rank=rank, world_size=2) for rank in range(2)]
    orders = [[sample.order for sample in (share[i] for i in range(len(share)))] for share in shares]
    assert sorted(orders[0] + orders[1]) == [(i, 0) for i in range(5)]
    assert not set(orders[0]) & set(orders[1])


def test_zsl_and_gzsl_sets_by_hand():
    items = [
        LabelledItem("A", "A", ("cat", "car")),
        LabelledItem("B", "B", ("dog",)),
        LabelledItem("C", "C", ("boat",)),
        LabelledItem("D", "D", ()),
    ]
    # ZSL: images with at least one unseen label (car, boat); GZSL: every image
    assert [item.key for _, item in select_items(items, ["car", "boat"])] == ["A", "C"]
    assert [item.key for _, item in select_items(items)] == ["A", "B", "C", "D"]


def test_label_space_sources_and_unseen_checks(reference_file: Path):
    source = open_labelled_source(str(reference_file))
    assert resolve_label_space(source).labels == tuple(CLASSES)
    given = resolve_label_space(source, labels=["dog", "cat"], unseen=["cat"])
    assert given.labels == ("dog", "cat") and given.seen == ("dog",) and given.unseen == ("cat",)
    with pytest.raises(VocabularyError, match="not in the label space"):
        resolve_label_space(source, unseen=["zebra"])
    with pytest.raises(VocabularyError, match="repeats"):
        resolve_label_space(source, labels=["dog", "dog"])


def test_empty_sets_are_errors(tmp_path: Path, reference_file: Path):
    source = open_labelled_source(str(reference_file))
    with pytest.raises(DataError, match="no image has any"):
        labelled_dataset(source, ["tree"], to_tensor, require_any=["tree"])
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no images"):
        open_labelled_source(str(empty))
    with pytest.raises(UsageError):
        open_labelled_source([str(reference_file), str(tmp_path / "x.tar")])


REFERENCE_DIR = Path("/work/shared/data/reference-annotations")


@pytest.mark.skipif(not (REFERENCE_DIR / "coco_test_65_filtered.json").exists(), reason="reference split files absent")
def test_zsl_set_from_the_gzsl_file_is_the_reference_zsl_file():
    """The reference's test_17 (ZSL) is test_65 restricted to images with an unseen label, unseen labels kept."""
    gzsl = open_labelled_source(str(REFERENCE_DIR / "coco_test_65_filtered.json"))
    zsl = open_labelled_source(str(REFERENCE_DIR / "coco_test_17_filtered.json"))
    space = resolve_label_space(gzsl, unseen=zsl.classes)
    assert len(space.seen) == 48 and len(space.unseen) == 17
    selected = select_items(gzsl.items, space.unseen)
    unseen = set(space.unseen)
    ours = sorted((item.key, tuple(sorted(unseen.intersection(item.labels)))) for _, item in selected)
    theirs = sorted((item.key, tuple(sorted(item.labels))) for item in zsl.items)
    assert ours == theirs


def test_relative_paths_name_files_beside_the_annotation_file(tmp_path: Path, monkeypatch):
    write_image(tmp_path / "set" / "img" / "a.png", seed=7)
    manifest = tmp_path / "set" / "labels.jsonl"
    manifest.write_text(json.dumps({"image": "img/a.png", "labels": ["sky"]}) + "\n")
    monkeypatch.chdir(tmp_path)
    source = open_labelled_source("set/labels.jsonl")
    assert source.items == (LabelledItem("img/a.png", os.path.join("set", "img/a.png"), ("sky",)),)
    found, tally = read_all(labelled_dataset(source, ("sky",), to_tensor))
    assert list(found) == ["img/a.png"] and not tally.failed
    elsewhere = open_labelled_source("set/labels.jsonl", root=tmp_path / "other")  # --root still wins
    assert elsewhere.items[0].path == str(tmp_path / "other" / "img/a.png")
    _, tally = read_all(labelled_dataset(elsewhere, ("sky",), to_tensor))
    assert str(tmp_path / "other" / "img/a.png") in tally.failed[0][1]  # the failure says where it looked


def test_labelled_shards_fail_samples_the_way_tag_reads_shards(tmp_path: Path):
    """Train and eval read shards through tag's sample stage, so they record what tag records: a key whose
    members come back later, a sample without an image member (naming what it has), a cut-off shard."""
    import tarfile

    from ramtag.data.shards import ShardDataset

    odd = write_shard(
        tmp_path / "odd.tar",
        [
            ("a", {"png": image_bytes(1), "txt": b"cat"}),
            ("b", {"txt": b"dog"}),
            ("a", {"png": image_bytes(3), "txt": b"car"}),
        ],
    )
    samples = [(key, {"png": image_bytes(seed), "txt": b"boat"}) for seed, key in enumerate("xyz")]
    whole = write_shard(tmp_path / "whole.tar", samples)
    with tarfile.open(whole) as archive:
        cut = archive.getmembers()[2].offset_data + 10  # inside the second sample's image
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:cut])
    source = open_labelled_source([str(odd), str(tmp_path / "cut.tar")])
    found, tally = read_all(labelled_dataset(source, CLASSES, to_tensor))
    tagged = {record.key: record.error for url in source.shards for record in ShardDataset([url], to_tensor)}
    assert set(found) == {key for key, error in tagged.items() if error is None} == {"odd.tar/a", "cut.tar/x"}
    assert dict(tally.failed) == {key: error for key, error in tagged.items() if error is not None}
    assert dict(tally.failed)["odd.tar/a (repeat 2)"].endswith("(members of a sample must be consecutive)")
    assert dict(tally.failed)["odd.tar/b"] == "no image in sample (members: txt)"
    assert dict(tally.failed)["cut.tar/"].startswith("cannot read shard after 1 sample(s)")
