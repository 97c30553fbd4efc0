"""Input expansion (folders, files, lists, stdin, manifests, shards) and the decoding datasets."""

from __future__ import annotations

import io
import os
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from ramtag.data.records import FileDataset, collate_records
from ramtag.data.shard_columns import parse_shard_columns
from ramtag.data.shards import ShardDataset, shard_name, shard_split_problem
from ramtag.data.sources import plan_inputs
from ramtag.errors import DataError, UsageError
from tests.io_fixtures import image_bytes, image_shard, random_pixels, write_image, write_shard


def as_tensor(img) -> torch.Tensor:
    """A transform that keeps pixels recognisable: uint8 C x H x W."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def keys_of(plan) -> list[str]:
    return plan.files["key"].to_pylist()


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    write_image(root / "b.png", 1)
    write_image(root / "A.JPG", 2, "JPEG")
    write_image(root / "sub" / "c.PnG", 3, "PNG")
    write_image(root / "sub" / "deeper" / "d.webp", 4, "WEBP")
    write_image(root / "e.TIFF", 5, "TIFF")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "data.json").write_text("{}")
    return root


# -- directories ------------------------------------------------------------------------------


def test_directory_is_walked_recursively_in_sorted_order(photos):
    plan = plan_inputs([str(photos)])
    assert keys_of(plan) == sorted(["b.png", "A.JPG", "sub/c.PnG", "sub/deeper/d.webp", "e.TIFF"])
    assert plan.files["path"].to_pylist() == [str(photos / key) for key in keys_of(plan)]
    assert plan.shards == [] and plan.warnings == []


def test_symlink_loop_and_broken_link_are_warnings(photos):
    os.symlink(photos, photos / "sub" / "loop")
    os.symlink(photos / "missing.jpg", photos / "broken.jpg")
    os.symlink("self", photos / "self")
    seen: list[str] = []
    plan = plan_inputs([str(photos)], on_warning=seen.append)
    assert len(keys_of(plan)) == 5
    assert seen == plan.warnings
    assert any("symlink loop" in warning and "loop" in warning for warning in seen)
    assert any("broken.jpg" in warning for warning in seen)
    assert any(warning.startswith(str(photos / "self")) for warning in seen)


def test_symlinked_folder_that_is_not_a_loop_is_followed(photos, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "x.png", 9)
    os.symlink(elsewhere, photos / "linked")
    assert "linked/x.png" in keys_of(plan_inputs([str(photos)]))


def test_unreadable_directory_is_a_warning(photos, monkeypatch):
    locked = str(photos / "sub" / "deeper")
    real_scandir = os.scandir

    def scandir(path):  # chmod 000 does not stop root, so refuse the way the kernel would
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    plan = plan_inputs([str(photos)])
    assert "sub/deeper/d.webp" not in keys_of(plan) and "b.png" in keys_of(plan)
    assert plan.warnings == [f"{locked}: cannot read directory (Permission denied); skipped"]


def test_same_key_from_two_folders_is_refused(tmp_path):
    write_image(tmp_path / "a" / "1.png", 1)
    write_image(tmp_path / "b" / "1.png", 2)
    with pytest.raises(DataError, match="'1.png' would name two different files"):
        plan_inputs([str(tmp_path / "a"), str(tmp_path / "b")])


def test_same_file_named_twice_is_tagged_once(photos):
    plan = plan_inputs([str(photos / "b.png"), str(photos / "b.png")])
    assert keys_of(plan) == [str(photos / "b.png")]
    assert any("more than once" in warning for warning in plan.warnings)


# -- files, lists, stdin ------------------------------------------------------------------------


def test_single_file_key_is_the_path_as_given(photos, monkeypatch):
    monkeypatch.chdir(photos)
    plan = plan_inputs(["sub/c.PnG", "notes.txt"])
    assert keys_of(plan) == ["sub/c.PnG", "notes.txt"]  # named explicitly: no extension filter


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        plan_inputs([str(tmp_path / "nope.jpg")])


def test_list_file(photos, monkeypatch):
    monkeypatch.chdir(photos)
    (photos / "list.txt").write_text("b.png\n\nsub/c.PnG\nsub\nmissing.png\n")
    plan = plan_inputs(["@list.txt"])
    assert keys_of(plan) == ["b.png", "sub/c.PnG", "missing.png"]
    assert any("skipped 1 directory" in warning for warning in plan.warnings)
    records = [FileDataset(plan.files, as_tensor)[i] for i in range(3)]
    assert [record.error for record in records[:2]] == [None, None]
    assert records[2].image is None and records[2].error.startswith("cannot read")


def test_missing_list_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such list file"):
        plan_inputs([f"@{tmp_path / 'absent.txt'}"])


def test_stdin_paths_and_root(photos):
    stream = io.StringIO("b.png\nsub/c.PnG\n")
    plan = plan_inputs(["-"], stdin=stream, root=photos)
    assert keys_of(plan) == ["b.png", "sub/c.PnG"]
    assert plan.files["path"].to_pylist() == [str(photos / "b.png"), str(photos / "sub/c.PnG")]
    with pytest.raises(DataError, match="more than once"):
        plan_inputs(["-", "-"], stdin=io.StringIO(""))


def test_mixed_inputs_in_one_run(photos, tmp_path):
    shard = image_shard(tmp_path / "s.tar", ["k1"])
    plan = plan_inputs([str(photos / "sub"), str(photos / "b.png"), str(shard)])
    assert keys_of(plan) == ["c.PnG", "deeper/d.webp", str(photos / "b.png")]
    assert plan.shards == [str(shard)]


# -- manifests ----------------------------------------------------------------------------------


@pytest.fixture
def manifest_rows(photos):
    return {
        "image": ["b.png", "sub/c.PnG", "gone.png"],
        "id": [10, 11, 12],
        "url": ["http://x/b", "http://x/c", None],
    }


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_manifest_with_path_and_keep_columns(fmt, photos, manifest_rows, monkeypatch):
    monkeypatch.chdir(photos)
    table = pa.table(manifest_rows)
    manifest = photos / f"manifest.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, manifest)
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, manifest)
    else:
        import json

        manifest.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    plan = plan_inputs([str(manifest)], path_column="image", keep_columns=["id", "url"])
    assert keys_of(plan) == manifest_rows["image"]
    assert plan.extra_schema.names == ["id", "url"]
    assert plan.files["id"].to_pylist() == manifest_rows["id"]
    assert plan.files["url"].to_pylist() == manifest_rows["url"]
    dataset = FileDataset(plan.files, as_tensor)
    records = [dataset[i] for i in range(len(dataset))]
    assert [record.extra for record in records] == [
        {"id": i, "url": u} for i, u in zip(manifest_rows["id"], manifest_rows["url"])
    ]
    assert records[0].error is None and records[2].error.startswith("cannot read")


def test_manifest_errors(photos):
    manifest = photos / "m.parquet"
    pq.write_table(pa.table({"file": ["b.png"]}), manifest)
    with pytest.raises(DataError, match=r"no column\(s\) path \(columns: file\)"):
        plan_inputs([str(manifest)])
    with pytest.raises(DataError, match="output columns"):
        plan_inputs([str(manifest)], path_column="file", keep_columns=["tags"])
    with pytest.raises(DataError, match="no such manifest"):
        plan_inputs([str(photos / "absent.csv")])


def test_keep_columns_need_a_manifest(photos):
    with pytest.raises(UsageError, match="no manifest"):
        plan_inputs([str(photos)], keep_columns=["id"])


def test_carried_columns_are_null_for_other_inputs(photos):
    manifest = photos / "m.csv"
    manifest.write_text(f"path,id\n{photos / 'b.png'},7\n")
    plan = plan_inputs([str(photos / "sub"), str(manifest)], keep_columns=["id"])
    assert plan.files["id"].to_pylist() == [None, None, 7]


# -- shards -------------------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    return [
        image_shard(folder / f"{index:06d}.tar", [f"s{index}-{k}" for k in range(3)], index * 10) for index in range(4)
    ]


def test_brace_pattern_expands_to_shards(shards):
    folder = shards[0].parent
    plan = plan_inputs([f"{folder}/{{000000..000003}}.tar"])
    assert plan.shards == [str(path) for path in shards]
    assert plan.files.num_rows == 0


def test_quoted_glob_expands(shards):
    assert plan_inputs([f"{shards[0].parent}/*.tar"]).shards == [str(path) for path in shards]


def test_a_shard_named_twice_is_read_once(shards):
    plan = plan_inputs([str(shards[0]), f"{shards[0].parent}/*.tar"])
    assert plan.shards == [str(path) for path in shards]
    assert plan.warnings == ["1 shard(s) named more than once; each is read once"]


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("{folder}/{{000000..000003.tar", "malformed brace pattern"),
        ("{folder}/{{000000...000003}}.tar", "not expanded"),
        ("{folder}/{{}}.tar", "not expanded"),
        ("{folder}/none-*.tar", "matches nothing"),
        ("{folder}/{{000000..000009}}.tar", "no such shard"),
    ],
)
def test_bad_shard_patterns_are_errors(shards, pattern, message):
    with pytest.raises(DataError, match=message):
        plan_inputs([pattern.format(folder=shards[0].parent)])


def read_all(dataset, **loader_kwargs):
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_records, **loader_kwargs)
    rows = []
    for batch in loader:
        for index, key in enumerate(batch.keys):
            rows.append((key, batch.sources[index], batch.images[index], None))
        for key, source, error in zip(batch.failed_keys, batch.failed_sources, batch.failed_errors):
            rows.append((key, source, None, error))
    return rows


def test_shard_samples_are_decoded_with_shard_keys(shards):
    rows = read_all(ShardDataset([f"pipe:cat {shards[0]}", str(shards[1])], as_tensor))
    assert [row[0] for row in rows] == [f"000000.tar/s0-{k}" for k in range(3)] + [
        f"000001.tar/s1-{k}" for k in range(3)
    ]
    assert rows[0][1] == f"pipe:cat {shards[0]}"
    assert all(row[3] is None for row in rows)
    assert rows[0][2].shape == (3, 16, 16)


def test_bad_samples_and_broken_shards_become_error_rows(tmp_path):
    good = image_bytes(1, "JPEG")
    shard = write_shard(
        tmp_path / "mixed.tar",
        [
            ("ok", {"jpg": good}),
            ("bad", {"jpg": b"garbage"}),
            ("noimg", {"txt": b"caption"}),
            ("png", {"PNG": image_bytes(2)}),
        ],
    )
    truncated = tmp_path / "truncated.tar"
    with tarfile.open(shard) as archive:
        cut = archive.getmembers()[1].offset_data + 10  # inside the second sample's image
    truncated.write_bytes(shard.read_bytes()[:cut])
    rows = read_all(ShardDataset([str(shard), str(truncated), "pipe:exit 3", str(tmp_path / "absent.tar")], as_tensor))
    by_key = {row[0]: row for row in rows}
    assert by_key["mixed.tar/ok"][3] is None
    assert by_key["mixed.tar/png"][3] is None  # member suffixes are case-insensitive
    assert by_key["mixed.tar/bad"][3] == "not an image"
    assert by_key["mixed.tar/noimg"][3] == "no image in sample (members: txt)"
    assert by_key["truncated.tar/ok"][3] is None
    assert by_key["truncated.tar/"][3].startswith("cannot read shard after 1 sample(s)")
    assert by_key["3/"][3] == "cannot read shard: command exited with status 3"
    assert by_key["absent.tar/"][3].startswith("cannot read shard")


def test_shards_split_by_rank_and_worker_cover_every_sample_once(shards):
    every = {f"s{index}-{k}" for index in range(4) for k in range(3)}
    seen: list[str] = []
    for rank in range(2):
        dataset = ShardDataset([str(path) for path in shards], as_tensor, rank=rank, world_size=2)
        seen += [row[0].split("/")[1] for row in read_all(dataset, num_workers=2)]
    assert sorted(seen) == sorted(every)


def test_resume_skips_done_shard_samples(shards):
    done = {"000000.tar/s0-0", "000000.tar/s0-2"}
    rows = read_all(ShardDataset([str(shards[0])], as_tensor, skip_keys=done))
    assert [row[0] for row in rows] == ["000000.tar/s0-1"]


def test_fewer_shards_than_ranks_times_workers_is_reported():
    assert shard_split_problem(8, 2, 4) is None
    assert shard_split_problem(0, 2, 4) is None
    assert "workers would idle" in shard_split_problem(6, 2, 4)
    assert "1 rank(s) would get no shard" in shard_split_problem(1, 2, 1)


# -- files through a DataLoader -------------------------------------------------------------------


def test_file_dataset_in_workers_keeps_order_and_failures_aside(photos, tmp_path):
    (photos / "zz-broken.png").write_bytes(b"\x89PNG broken")
    (photos / "zz-empty.jpg").write_bytes(b"")
    plan = plan_inputs([str(photos)])
    rows = read_all(FileDataset(plan.files, as_tensor), num_workers=2)
    assert sorted(row[0] for row in rows) == sorted(keys_of(plan))
    errors = {row[0]: row[3] for row in rows if row[3] is not None}
    assert errors == {"zz-broken.png": "not an image", "zz-empty.jpg": "empty file"}
    pixels = {row[0]: row[2] for row in rows if row[2] is not None}
    np.testing.assert_array_equal(pixels["b.png"].permute(1, 2, 0).numpy(), random_pixels(1))


def test_files_split_by_rank_and_resume(photos):
    plan = plan_inputs([str(photos)])
    shares = [plan.files_for_rank(rank, 3)["key"].to_pylist() for rank in range(3)]
    assert sorted(sum(shares, [])) == sorted(keys_of(plan))
    assert shares[0] == keys_of(plan)[0::3]
    remaining = plan.without_keys({"b.png", "sub/c.PnG"})
    assert keys_of(remaining) == [key for key in keys_of(plan) if key not in {"b.png", "sub/c.PnG"}]


def test_collate_of_only_failures_has_no_images(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"nope")
    batch = collate_records([FileDataset(plan_inputs([str(tmp_path)]).files, as_tensor)[0]])
    assert batch.images is None and batch.failed_keys == ["x.jpg"] and len(batch) == 1


def test_shard_named_by_pipe_command_needs_a_command():
    with pytest.raises(DataError, match="empty pipe command"):
        plan_inputs(["pipe:  "])


@pytest.mark.skipif(shutil.which("cat") is None, reason="needs cat")
def test_pipe_shard_is_planned_as_given(shards):
    plan = plan_inputs([f"pipe:cat {shards[0].parent}/{{000000..000001}}.tar"])
    assert plan.shards == [f"pipe:cat {shards[0].parent}/000000.tar", f"pipe:cat {shards[0].parent}/000001.tar"]


def test_shard_names_in_keys():
    assert shard_name("/data/shards/000001.tar") == "000001.tar"
    assert shard_name("https://host/a/000002.tar?token=x") == "000002.tar"
    assert shard_name("pipe:curl -s -L https://host/a/000003.tar") == "000003.tar"


def test_shards_that_share_a_file_name_are_refused(tmp_path):
    first = image_shard(tmp_path / "a" / "same.tar", ["k"])
    second = image_shard(tmp_path / "b" / "same.tar", ["k"])
    with pytest.raises(DataError, match="share the name 'same.tar'"):
        plan_inputs([str(first), str(second)])


def test_a_key_that_comes_back_later_in_a_shard_is_its_own_error_row(tmp_path):
    shard = write_shard(
        tmp_path / "odd.tar",
        [
            ("a", {"jpg": image_bytes(1, "JPEG")}),
            ("b", {"jpg": image_bytes(2, "JPEG")}),
            ("a", {"png": image_bytes(3)}),
        ],
    )
    rows = read_all(ShardDataset([str(shard)], as_tensor))
    assert [(row[0], row[3] is None) for row in rows] == [
        ("odd.tar/a", True),
        ("odd.tar/b", True),
        ("odd.tar/a (repeat 2)", False),
    ]
    assert "must be consecutive" in rows[2][3]


def test_link_members_become_error_rows_not_silence(tmp_path):
    shard = tmp_path / "links.tar"
    with tarfile.open(shard, "w") as archive:
        data = image_bytes(1, "JPEG")
        info = tarfile.TarInfo("real.jpg")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        for name, kind in (("hard.jpg", tarfile.LNKTYPE), ("soft.jpg", tarfile.SYMTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "real.jpg"
            archive.addfile(link)
    rows = {row[0]: row[3] for row in read_all(ShardDataset([str(shard)], as_tensor))}
    assert rows["links.tar/real"] is None
    for key in ("links.tar/hard", "links.tar/soft"):
        assert rows[key] == "image member is a link (jpg); links in shards are not followed"


def test_a_shard_cut_at_a_member_boundary_is_reported(tmp_path):
    shard = image_shard(tmp_path / "whole.tar", ["a", "b", "c"])
    with tarfile.open(shard) as archive:
        boundary = archive.getmembers()[4].offset  # where sample c starts: two whole samples before it
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:boundary])
    rows = {row[0]: row[3] for row in read_all(ShardDataset([str(shard), str(cut)], as_tensor))}
    assert [key for key in rows if key.startswith("whole.tar")] == ["whole.tar/a", "whole.tar/b", "whole.tar/c"]
    assert not any(key == "whole.tar/" for key in rows)
    assert rows["cut.tar/a"] is None
    assert (
        rows["cut.tar/"]
        == "cannot read shard after 2 sample(s): the archive ends without its end-of-archive blocks (cut off?)"
    )


def test_a_folder_without_images_is_a_warning(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    plan = plan_inputs([str(tmp_path / "empty")])
    assert plan.files.num_rows == 0
    assert len(plan.warnings) == 1 and "no image files" in plan.warnings[0]


# -- relative paths in manifests ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_paths_resolve_beside_the_manifest(fmt, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    table = pa.table({"path": ["b.png", "sub/c.PnG"], "id": [1, 2]})
    manifest = photos / f"m.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, manifest)
    elif fmt == "csv":
        manifest.write_text("path,id\nb.png,1\nsub/c.PnG,2\n")
    else:
        manifest.write_text('{"path": "b.png", "id": 1}\n{"path": "sub/c.PnG", "id": 2}\n')
    plan = plan_inputs([str(manifest)])
    assert keys_of(plan) == ["b.png", "sub/c.PnG"]  # keys stay as written
    assert plan.files["path"].to_pylist() == [str(photos / "b.png"), str(photos / "sub/c.PnG")]
    other = tmp_path / "elsewhere"
    other.mkdir()
    overridden = plan_inputs([str(manifest)], root=other)  # --root still wins
    assert overridden.files["path"].to_pylist() == [str(other / "b.png"), str(other / "sub/c.PnG")]


def test_manifest_written_for_the_current_directory_gets_a_hint(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(photos)
    folder = tmp_path / "lists"
    folder.mkdir()
    manifest = folder / "m.csv"
    manifest.write_text("path\nb.png\n")
    warnings: list[str] = []
    plan_inputs([str(manifest)], on_warning=warnings.append)
    assert len(warnings) == 1 and "--root ." in warnings[0]


def test_keep_columns_key_is_carried_as_source_key(photos):
    manifest = photos / "m.csv"
    manifest.write_text("path,key\nb.png,000000001\n")
    warnings: list[str] = []
    plan = plan_inputs([str(manifest)], keep_columns=["key"], on_warning=warnings.append)
    assert plan.extra_schema.names == ["source_key"]
    assert plan.files["source_key"].to_pylist() == [1]  # as pyarrow's CSV reader types it
    assert any("source_key" in warning for warning in warnings)
    with pytest.raises(UsageError, match="kept too"):
        plan_inputs([str(manifest)], keep_columns=["key", "source_key"])


def test_parquet_image_column_named_as_path_column_is_refused_in_one_line(photos):
    manifest = photos / "m.parquet"
    pq.write_table(pa.table({"jpg": [b"\xff\xd8"], "url": ["u"]}), manifest)
    with pytest.raises(UsageError, match="holds image bytes .* pass --image-column jpg"):
        plan_inputs([str(manifest)], path_column="jpg")
    with pytest.raises(DataError, match="column jpg holds image bytes: pass --image-column jpg"):
        plan_inputs([str(manifest)])


def test_shard_keep_columns_plan_string_fields(tmp_path):
    import json as jsonlib

    shard = write_shard(
        tmp_path / "000000.tar",
        [("000000000", {"jpg": image_bytes(1), "txt": b"a caption\n", "json": jsonlib.dumps({"url": "u"}).encode()})],
    )
    plan = plan_inputs([str(shard)], keep_columns=["__key__", "txt", "json.url"])
    assert plan.extra_schema == pa.schema([("sample_key", pa.string()), ("txt", pa.string()), ("url", pa.string())])
    dataset = ShardDataset(plan.shards, as_tensor, columns=parse_shard_columns(["__key__", "txt", "json.url"]))
    (record,) = list(dataset)
    assert record.extra == {"sample_key": "000000000", "txt": "a caption", "url": "u"}
    with pytest.raises(UsageError, match="no such member or JSON field"):
        plan_inputs([str(shard)], keep_columns=["cls"])
