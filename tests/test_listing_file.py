"""The streamed listing: manifests read by record batch, the spill written a unit at a time, and the repeat
check that holds hashes on disk instead of a set of keys."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ramtag.data import listing_file
from ramtag.data.listing_file import ListingWriter, RepeatedKeys, RepeatFilter, listing_batches, open_listing
from ramtag.data.manifests import resolved_paths
from ramtag.data.sources import plan_inputs
from ramtag.data.units import plan_units
from ramtag.errors import DataError

SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("path", pa.string()), ("error", pa.string())])


def rows_batch(keys: list[str], paths: list[str | None] | None = None) -> pa.RecordBatch:
    paths = list(keys) if paths is None else paths
    return pa.record_batch(
        [pa.array(keys), pa.array(keys), pa.array(paths, pa.string()), pa.nulls(len(keys), pa.string())],
        schema=SCHEMA,
    )


@pytest.mark.parametrize("base", [".", "photos", "/data/photos", "/", "photos/"])
def test_vectorised_paths_equal_pathlib(base):
    rng = random.Random(14)
    pieces = ["a", "b.jpg", ".", "..", "", " ", "é", "x y"]
    paths = ["/".join(rng.choice(pieces) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    paths += ["s3://bucket/a.jpg", "/abs/a.jpg", "./a.jpg", "a//b.jpg", "a/", ".", "file://x/y.jpg"]
    resolved = resolved_paths(pa.array(paths, pa.string()), Path(base)).to_pylist()
    expected = [
        path if path.startswith("/") or "://" in path else str(Path(base) / path)
        for path in paths
    ]
    assert resolved == expected


def test_writer_cuts_exact_units_whatever_it_is_given(tmp_path):
    rng = random.Random(3)
    keys = [f"k{index:05d}" for index in range(1_000)]
    writer = ListingWriter(tmp_path / "l.arrow", SCHEMA, 64)
    start = 0
    while start < len(keys):
        size = rng.choice([1, 7, 63, 64, 65, 200])
        writer.write(rows_batch(keys[start : start + size]))
        start += size
    writer.close()
    assert writer.sizes == [64] * 15 + [40]
    reader = open_listing(tmp_path / "l.arrow")
    assert [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)] == writer.sizes
    assert [key for batch in listing_batches(tmp_path / "l.arrow") for key in batch.column(0).to_pylist()] == keys


def test_repeats_are_dropped_and_one_key_for_two_files_is_refused(tmp_path):
    batches = [rows_batch(["a", "b", "c"]), rows_batch(["b", "d", "a"]), rows_batch(["e", "a"])]
    with RepeatedKeys(tmp_path) as repeats:
        for batch in batches:
            repeats.add(batch.column(0))
        suspects = repeats.suspects()
    assert suspects == {hash("a"), hash("b")}
    drop = RepeatFilter(suspects)
    kept = [key for batch in drop(batches) for key in batch.column(0).to_pylist()]
    assert kept == ["a", "b", "c", "d", "e"] and drop.dropped == 3
    assert list(tmp_path.iterdir()) == []  # its bucket files are gone
    clash = [rows_batch(["a", "b"]), rows_batch(["a"], ["elsewhere/a"])]
    with pytest.raises(DataError, match="key 'a' would name two different files"):
        list(RepeatFilter({hash("a")})(clash))


def test_keys_whose_hashes_collide_are_told_apart(tmp_path, monkeypatch):
    # Four hash values for 300 keys: every bucket holds colliding keys; only real repeats may go.
    monkeypatch.setattr(
        listing_file, "_hashes", lambda keys: pa.array([len(key) % 4 for key in keys.to_pylist()], pa.int64())
    )
    keys = [f"{'x' * (index % 9)}{index}" for index in range(300)]
    batches = [rows_batch(keys[:150]), rows_batch(keys[150:] + keys[:5])]
    with RepeatedKeys(tmp_path) as repeats:
        for batch in batches:
            repeats.add(batch.column(0))
        drop = RepeatFilter(repeats.suspects())
    assert [key for batch in drop(batches) for key in batch.column(0).to_pylist()] == keys
    assert drop.dropped == 5


def test_the_spilled_listing_equals_the_in_memory_plan(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ["a.jpg", "b.png", "sub/c.jpg"]:
        (photos / name).write_bytes(b"")
    manifest = tmp_path / "m.parquet"
    names = [f"img{index:04d}.jpg" for index in range(300)] + ["", None, "img0001.jpg"]  # blank rows, a repeat
    pq.write_table(pa.table({"path": names, "id": list(range(len(names)))}), manifest, row_group_size=50)
    listed = tmp_path / "list.txt"
    listed.write_text(f"{photos / 'a.jpg'}\n{photos / 'b.png'}\n")
    inputs = [str(photos), str(manifest), f"@{listed}"]
    warnings: list[str] = []
    plan = plan_units(inputs, tmp_path / "work", unit_rows=64, keep_columns=["id"], on_warning=warnings.append)
    spilled = pa.Table.from_batches(list(listing_batches(plan.listing)))
    in_memory = plan_inputs(inputs, keep_columns=["id"]).files
    assert spilled.equals(in_memory)
    assert spilled.num_rows == 3 + 302 + 2  # the repeated manifest row dropped; the list keys differ from the folder's
    assert [unit.rows for unit in plan.units] == [64, 64, 64, 64, 51]
    assert "1 input(s) named more than once; each is tagged once" in warnings
    assert sorted(path.name for path in (tmp_path / "work").iterdir()) == ["listing.arrow", "units.json"]


def test_a_short_listing_is_cut_into_smaller_units_for_every_worker(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "".join(f"i{index}.jpg\n" for index in range(256)))
    plan = plan_units([str(manifest)], tmp_path / "work", unit_rows=16_384, spread_over=4)
    assert [unit.rows for unit in plan.units] == [64, 64, 64, 64]


_PEAK_SCRIPT = """
import json, sys, tracemalloc
import pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
from ramtag.data import manifests
from ramtag.data.units import plan_units
manifest, work, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
manifests.MANIFEST_BATCH_ROWS = 2_000
pool = pa.default_memory_pool()
# the first call's lazy imports are not the listing's cost
pq.write_table(pa.table({"path": ["a.jpg"]}), str(work) + "-warm.parquet")
plan_units([str(work) + "-warm.parquet"], work.with_name(work.name + "-warm"), unit_rows=2_000)
tracemalloc.start()
if mode == "whole":  # what planning cost before: the table read whole and its paths as Python strings
    paths = pq.read_table(manifest)["path"].to_pylist()
    rows = [(path, path, path, None) for path in paths]
else:
    plan_units([manifest], work, unit_rows=2_000)
print(json.dumps({"python": tracemalloc.get_traced_memory()[1], "arrow": pool.max_memory()}))
"""


def test_planning_a_manifest_holds_a_batch_not_the_manifest(tmp_path):
    rows = 400_000
    manifest = tmp_path / "m.parquet"
    paths = [f"shard{index // 1000:04d}/image{index:09d}-with-a-longer-name.jpg" for index in range(rows)]
    pq.write_table(pa.table({"path": paths}), manifest, row_group_size=10_000)
    del paths

    def peak(mode: str) -> dict:
        run = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(manifest), str(tmp_path / f"work-{mode}"), mode],
            capture_output=True, text=True, check=True,
        )
        return json.loads(run.stdout)

    whole, streamed = peak("whole"), peak("stream")
    assert streamed["python"] < whole["python"] / 10
    assert streamed["arrow"] < whole["arrow"] / 4
