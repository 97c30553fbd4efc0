"""Label names from a WebDataset sample's .json / .txt / .cls member."""

from __future__ import annotations

import json

import pytest

from ramtag.data.shard_labels import labels_from_cls, labels_from_json, labels_from_txt, shard_labels
from ramtag.errors import DataError

CLASSES = ["cat", "dog", "red car"]


def test_json_list_and_object_as_bytes_or_decoded():
    assert labels_from_json(b'["cat", "dog"]') == ["cat", "dog"]
    assert labels_from_json(json.dumps({"labels": ["dog"], "caption": "x"}).encode()) == ["dog"]
    assert labels_from_json({"labels": [" cat ", "cat", ""]}) == ["cat"]  # stripped, deduplicated
    assert labels_from_json([]) == []


def test_txt_lines_or_commas():
    assert labels_from_txt(b"cat\nred car\n\n") == ["cat", "red car"]
    assert labels_from_txt("cat, red car,dog") == ["cat", "red car", "dog"]
    assert labels_from_txt("red car") == ["red car"]


def test_cls_indices_in_every_encoding():
    assert labels_from_cls(b"2 0", CLASSES) == ["red car", "cat"]
    assert labels_from_cls("1,2\n0", CLASSES) == ["dog", "red car", "cat"]
    assert labels_from_cls(1, CLASSES) == ["dog"]  # webdataset decodes a single .cls to an int
    assert labels_from_cls([0, 0], CLASSES) == ["cat"]
    assert labels_from_cls(b"", CLASSES) == []


@pytest.mark.parametrize("bad", [b"3", b"-1", b"one", b"1.5", True])
def test_bad_cls_raises_data_error(bad):
    with pytest.raises(DataError):
        labels_from_cls(bad, CLASSES)


@pytest.mark.parametrize("bad", [b"{not json", b'{"labels": "cat"}', b'[1, 2]', b"\xff\xfe", b'"cat"'])
def test_bad_json_raises_data_error(bad):
    with pytest.raises(DataError):
        labels_from_json(bad)


def test_member_priority_and_fallbacks():
    sample = {"__key__": "k", "json": b'["cat"]', "txt": b"dog", "cls": b"2"}
    assert shard_labels(sample, CLASSES) == ["cat"]
    assert shard_labels({"txt": b"dog", "cls": b"2"}, CLASSES) == ["dog"]
    assert shard_labels({".cls": b"2"}, CLASSES) == ["red car"]
    assert shard_labels({"idx": b"0 1", "cls": b"2"}, CLASSES) == ["cat", "dog"]
    assert shard_labels({"cls": b"2"}) is None  # indices mean nothing without the class list
    assert shard_labels({"jpg": b"..."}) is None
    # a metadata .json without labels is not a label member
    assert shard_labels({"json": b'{"url": "x"}', "txt": b"dog"}) == ["dog"]
    assert shard_labels({"json": b'{"url": "x"}'}) is None


def test_reads_synthetic_shards(tmp_path):
    import webdataset as wds

    from ramtag.data import synth, synth_files

    synth_files.write_dataset(tmp_path, n=3, seed=0, image_size=32, formats={"webdataset"})
    shards = [str(p) for p in sorted((tmp_path / "shards").glob("*.tar"))]
    for raw, decoded in zip(wds.WebDataset(shards, shardshuffle=False),
                            wds.WebDataset(shards, shardshuffle=False).decode()):
        truth = synth.generate_scene(0, int(raw["__key__"]), 32).labels
        assert shard_labels(raw) == list(truth)
        assert shard_labels({"idx": raw["idx"]}, synth.ALL_LABELS) == list(truth)
        assert shard_labels(decoded) == list(truth)
