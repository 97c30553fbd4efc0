"""Inputs users already have: Parquet with embedded images (Hugging Face, img2dataset), save_to_disk folders,
img2dataset shards with their metadata, through `ramtag tag --model demo`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.io_fixtures import image_bytes, run_cli, write_shard

HF_IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
"""The Hugging Face `Image` feature's Arrow type (datasets' features/image.py, Image.pa_type)."""
HF_FEATURES = {"image": {"_type": "Image"}, "label": {"dtype": "int64", "_type": "Value"}}
CORRUPT = b"\xff\xd8\xff\xe0 not really a jpeg"



def rows_of(path) -> dict[str, dict]:
    rows = pq.read_table(path).to_pylist()
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "every row exactly once"
    return {row["key"]: row for row in rows}


@pytest.fixture()
def vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("red\nblue\ngreen\n")
    return path


def tag(vocab, *args, quiet: bool = True) -> int:
    common = ("--labels", vocab, "--model", "demo", "--device", "cpu", "--workers", 0) + (("-q",) if quiet else ())
    return run_cli("tag", *args, *common)


def hf_table(rows: int, corrupt: set[int] = frozenset(), paths: bool = True) -> pa.Table:
    images = [
        {"bytes": CORRUPT if index in corrupt else image_bytes(index, "JPEG", (24, 24)),
         "path": f"img{index:03d}.jpg" if paths else None}
        for index in range(rows)
    ]
    metadata = {b"huggingface": json.dumps({"info": {"features": HF_FEATURES}}).encode()}
    schema = pa.schema([pa.field("image", HF_IMAGE), pa.field("label", pa.int64())], metadata=metadata)
    return pa.table({"image": images, "label": list(range(rows))}, schema=schema)


def img2dataset_table(rows: int, corrupt: set[int] = frozenset()) -> pa.Table:
    """img2dataset's parquet output (output_format=parquet): the image bytes in jpg, its metadata beside."""
    return pa.table({
        "key": [f"{index:09d}" for index in range(rows)],
        "jpg": [CORRUPT if index in corrupt else image_bytes(100 + index, "JPEG", (24, 24)) for index in range(rows)],
        "url": [f"https://example.com/{index}.jpg" for index in range(rows)],
        "caption": [f"caption {index}" for index in range(rows)],
        "width": pa.array([24] * rows, pa.int64()),
    })


def test_hugging_face_parquet_keys_by_path_and_carries_columns(tmp_path, vocab):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(hf_table(6, corrupt={2}), data / "train-00000-of-00001.parquet", row_group_size=2)
    out = tmp_path / "tags.parquet"
    assert tag(vocab, data / "train-00000-of-00001.parquet", "--image-column", "image",
               "--keep-columns", "label", "-o", out) == 3  # the corrupt row is an error row
    rows = rows_of(out)
    assert sorted(rows) == [f"img{index:03d}.jpg" for index in range(6)]
    assert [rows[f"img{index:03d}.jpg"]["label"] for index in range(6)] == list(range(6))
    assert rows["img002.jpg"]["error"] and not rows["img002.jpg"]["tags"]
    assert all(rows[key]["error"] is None and rows[key]["tags"] for key in rows if key != "img002.jpg")
    assert pq.read_schema(out).field("label").type == pa.int64()


def test_hub_folder_without_paths_keys_by_file_and_row(tmp_path, vocab):
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    for shard in range(2):
        pq.write_table(hf_table(3, paths=False), hub / "data" / f"train-0000{shard}-of-00002.parquet")
    (hub / "README.md").write_text("---\ndataset_info: ...\n---\n")
    out = tmp_path / "tags.jsonl"
    assert tag(vocab, hub, "--image-column", "image", "-o", out) == 0
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    files = [str(hub / "data" / f"train-0000{shard}-of-00002.parquet") for shard in range(2)]
    assert sorted(keys) == sorted(f"{file}:{row}" for file in files for row in range(3))


def test_img2dataset_parquet_with_key_column_and_key_kept_under_another_name(tmp_path, vocab, capsys):
    table = tmp_path / "00000.parquet"
    pq.write_table(img2dataset_table(5, corrupt={4}), table)
    out = tmp_path / "tags.parquet"
    code = tag(vocab, table, "--image-column", "jpg", "--key-column", "key", "--keep-columns", "key,url,caption",
               "-o", out, quiet=False)
    assert code == 3
    assert "--keep-columns key: written as column source_key" in capsys.readouterr().err  # the rename is said
    rows = rows_of(out)
    assert sorted(rows) == [f"{index:09d}" for index in range(5)]
    assert rows["000000001"]["url"] == "https://example.com/1.jpg"
    assert rows["000000001"]["caption"] == "caption 1"
    assert rows["000000001"]["source_key"] == "000000001"
    assert rows["000000004"]["error"] and not rows["000000004"]["tags"]


def test_save_to_disk_folder_of_arrow_stream_files(tmp_path, vocab):
    """datasets' save_to_disk: data-*.arrow written with pa.ipc.new_stream, state.json listing them."""
    folder = tmp_path / "saved"
    folder.mkdir()
    table = hf_table(5)
    names = []
    for shard, (start, stop) in enumerate([(0, 3), (3, 5)]):
        name = f"data-0000{shard}-of-00002.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.slice(start, stop - start).to_batches(max_chunksize=2):
                writer.write_batch(batch)
        names.append(name)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "x", "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": HF_FEATURES}))
    out = tmp_path / "tags.parquet"
    assert tag(vocab, folder, "--image-column", "image", "--keep-columns", "label", "-o", out, "--part-rows", 2) == 0
    rows = rows_of(out)
    assert {key: row["label"] for key, row in rows.items()} == {f"img{i:03d}.jpg": i for i in range(5)}


def test_save_to_disk_folder_without_image_column_says_how(tmp_path, vocab, capsys):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "data-00000-of-00001.arrow").write_bytes(b"")
    (folder / "state.json").write_text("{}")
    (folder / "dataset_info.json").write_text("{}")
    assert tag(vocab, folder, "-o", tmp_path / "t.parquet") == 2
    assert "--image-column" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--path-column", "image"], "pass --image-column image"),
        (["--path-column", "jpg"], "pass --image-column jpg"),
        (["--image-column", "url"], "not image bytes"),
        (["--image-column", "missing"], "no column(s) missing"),
        (["--key-column", "key"], "--key-column names the key column"),
    ],
)
def test_wrong_columns_give_one_line(tmp_path, vocab, capsys, args, message):
    both = img2dataset_table(2).append_column("image", pa.array([None, None], HF_IMAGE))
    pq.write_table(both, tmp_path / "t.parquet")
    code = tag(vocab, tmp_path / "t.parquet", *args, "-o", tmp_path / "out.parquet")
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_table_run_killed_mid_unit_resumes_to_every_row_once(tmp_path, vocab, monkeypatch):
    table = tmp_path / "t.parquet"
    pq.write_table(hf_table(8, paths=False), table, row_group_size=2)
    out = tmp_path / "tags.parquet"
    import ramtag.data.units as units_module

    original = units_module.table_records

    def killed_after_three_rows(*args, **kwargs):
        for count, record in enumerate(original(*args, **kwargs)):
            if count == 3:
                raise KeyboardInterrupt  # as Ctrl-C would, mid-unit
            yield record

    monkeypatch.setattr(units_module, "table_records", killed_after_three_rows)
    assert tag(vocab, table, "--image-column", "image", "-o", out, "--part-rows", 1) == 130
    assert not out.exists()
    monkeypatch.setattr(units_module, "table_records", original)
    assert tag(vocab, table, "--image-column", "image", "-o", out, "--resume") == 0
    rows = rows_of(out)
    assert sorted(rows) == sorted(f"{table}:{row}" for row in range(8))
    assert all(row["tags"] for row in rows.values())


# -- img2dataset shards -------------------------------------------------------------------------


def img2dataset_shard(path, first: int, count: int):
    samples = []
    for index in range(first, first + count):
        key = f"{index:09d}"
        meta = {"url": f"https://example.com/{index}.jpg", "caption": f"caption {index}", "key": key,
                "width": 24, "height": 24, "status": "success"}
        samples.append((key, {"jpg": image_bytes(index, "JPEG", (24, 24)), "txt": f"caption {index}".encode(),
                              "json": json.dumps(meta).encode()}))
    return write_shard(path, samples)


def test_img2dataset_shard_metadata_carried(tmp_path, vocab):
    shard = img2dataset_shard(tmp_path / "000000.tar", 0, 3)
    out = tmp_path / "tags.parquet"
    assert tag(vocab, shard, "--keep-columns", "__key__,txt,json.url,json.width,json.key", "-o", out) == 0
    rows = rows_of(out)
    row = rows["000000.tar/000000001"]
    assert row["sample_key"] == "000000001"
    assert row["txt"] == "caption 1"
    assert row["url"] == "https://example.com/1.jpg"
    assert row["width"] == "24"  # JSON values other than strings are kept as JSON text
    assert row["source_key"] == "000000001"


def test_shard_column_no_sample_has_is_refused_before_tagging(tmp_path, vocab, capsys):
    shard = img2dataset_shard(tmp_path / "000000.tar", 0, 2)
    assert tag(vocab, shard, "--keep-columns", "json.uid", "-o", tmp_path / "t.parquet") == 2
    err = capsys.readouterr().err
    assert "json.uid" in err and "JSON fields: caption" in err
    assert not (tmp_path / "t.parquet").exists()


# -- relative paths and the first ten minutes ---------------------------------------------------


def test_eval_on_the_bundled_examples_from_the_repository_root(monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert run_cli("eval", "examples/labels.jsonl", "--model", "demo", "--device", "cpu", "--workers", 0, "--json",
                   "-") == 0
    assert json.loads(capsys.readouterr().out)


def test_synth_manifest_tagged_from_outside_its_folder(tmp_path, monkeypatch, vocab):
    assert run_cli("data", "synth", tmp_path / "synth", "--n", 4, "--seed", 1, "--format", "jsonl") == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "tags.parquet"
    assert tag(vocab, tmp_path / "synth" / "manifest.jsonl", "--path-column", "image", "-o", out) == 0
    assert len(rows_of(out)) == 4


def test_every_input_failing_names_the_first(tmp_path, vocab, capsys):
    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text("path\nnot-here/a.png\nnot-here/b.png\n")
    assert tag(vocab, manifest, "-o", tmp_path / "t.parquet") == 3
    err = capsys.readouterr().err
    assert f"the first: {tmp_path / 'lists' / 'not-here' / 'a.png'}: cannot read" in err
    assert tag(vocab, manifest, "-o", tmp_path / "t.parquet", "--overwrite", quiet=False) == 3
    first = next(line for line in capsys.readouterr().err.splitlines() if "not-here/a.png" in line)
    assert first.startswith("ramtag: not-here/a.png: cannot read") and str(tmp_path / "lists" / "not-here") in first


def test_column_mistakes_are_refused_before_the_model_loads(tmp_path, vocab, capsys, monkeypatch):
    from ramtag.cli.options import ModelChoice

    def no_model(self):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(ModelChoice, "load", no_model)
    pq.write_table(img2dataset_table(2), tmp_path / "t.parquet")
    assert tag(vocab, tmp_path / "t.parquet", "--image-column", "url", "-o", tmp_path / "o.parquet") == 2
    shard = img2dataset_shard(tmp_path / "000000.tar", 0, 1)
    assert tag(vocab, shard, "--keep-columns", "json.nope", "-o", tmp_path / "o.parquet") == 2
    assert "not image bytes" in capsys.readouterr().err


def test_struct_with_only_a_path_reads_the_file(tmp_path, vocab):
    """datasets keeps a local image file by path (bytes null) unless its files are embedded."""
    (tmp_path / "img.jpg").write_bytes(image_bytes(3, "JPEG", (24, 24)))
    images = pa.array([{"bytes": None, "path": "img.jpg"}, {"bytes": None, "path": None}], HF_IMAGE)
    pq.write_table(pa.table({"image": images}), tmp_path / "t.parquet")
    out = tmp_path / "tags.parquet"
    assert tag(vocab, tmp_path / "t.parquet", "--image-column", "image", "-o", out) == 3
    rows = rows_of(out)
    assert rows["img.jpg"]["error"] is None and rows["img.jpg"]["tags"]
    assert rows[f"{tmp_path / 't.parquet'}:1"]["error"] == "no image bytes in this row"


def test_image_column_with_no_table_is_refused(tmp_path, vocab, capsys):
    (tmp_path / "a.jpg").write_bytes(image_bytes(3, "JPEG", (24, 24)))
    assert tag(vocab, tmp_path, "--image-column", "image", "-o", tmp_path / "t.parquet") == 2
    assert "no input is a table" in capsys.readouterr().err


def test_dataset_dict_folder_reads_every_split(tmp_path):
    from ramtag.data.sources import plan_inputs

    for split, rows in (("train", 3), ("test", 2)):
        folder = tmp_path / "dd" / split
        folder.mkdir(parents=True)
        table = hf_table(rows)
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        (folder / "dataset_info.json").write_text("{}")
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    plan = plan_inputs([str(tmp_path / "dd")], image_column="image", keep_columns=["label"])
    assert [Path(path).parent.name for path in plan.tables] == ["train", "test"]
    assert plan.extra_schema == pa.schema([("label", pa.int64())])


def test_shards_killed_mid_run_resume_with_their_columns_once(tmp_path, vocab, monkeypatch):
    shards = [img2dataset_shard(tmp_path / f"00000{index}.tar", 3 * index, 3) for index in range(2)]
    out = tmp_path / "tags"
    from ramtag.data.shards import ShardDataset

    original = ShardDataset.read_shard

    def killed_in_the_second_shard(self, url):
        for count, record in enumerate(original(self, url)):
            if url.endswith("000001.tar") and count == 1:
                raise KeyboardInterrupt
            yield record

    monkeypatch.setattr(ShardDataset, "read_shard", killed_in_the_second_shard)
    pattern = str(tmp_path / "00000{0..1}.tar")
    columns = ("--keep-columns", "__key__,txt")
    assert tag(vocab, pattern, *columns, "-o", f"{out}/", "--part-rows", 1) == 130
    monkeypatch.setattr(ShardDataset, "read_shard", original)
    assert tag(vocab, pattern, *columns, "-o", f"{out}/", "--resume") == 0
    rows = rows_of(out)
    expected = [f"{shards[shard].name}/{key:09d}" for shard in range(2) for key in range(3 * shard, 3 * shard + 3)]
    assert sorted(rows) == expected
    assert all(row["txt"] == f"caption {int(row['sample_key'])}" for row in rows.values())


def test_table_units_read_by_several_workers(tmp_path, vocab):
    hub = tmp_path / "hub"
    hub.mkdir()
    for shard in range(2):
        pq.write_table(hf_table(3, paths=False), hub / f"train-0000{shard}-of-00002.parquet")
    out = tmp_path / "tags.parquet"
    code = run_cli("tag", hub, "--image-column", "image", "--keep-columns", "label", "-o", out, "--labels", vocab,
                   "--model", "demo", "--device", "cpu", "--workers", 2, "-q")
    assert code == 0
    rows = rows_of(out)
    assert len(rows) == 6 and sorted(row["label"] for row in rows.values()) == [0, 0, 1, 1, 2, 2]
