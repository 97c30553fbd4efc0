"""Tag tables as runs of work units write them (:mod:`ramtag.data.parts`, :mod:`ramtag.data.assemble`): formats,
metadata, stdout, dataset folders, nothing final before the end, exactly once after a kill, retried units, two
ranks, a failing writer thread, and loader batches flowing into the table."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ramtag.data.assemble import finish_units
from ramtag.data.layout import prepare_output, read_table_metadata
from ramtag.data.ledger import latest_entries
from ramtag.data.parts import UnitPartWriter
from ramtag.data.rows import TagBatch, schema_with_metadata, table_schema
from ramtag.data.units import UnitEnd
from ramtag.errors import OutputError
from ramtag.selection import select_tags
from tests.io_fixtures import write_tag_table

LABELS = ["cat", "dog", "car", "tree", "sky"]
REPO = Path(__file__).resolve().parents[2]


def scores_for(keys: list[str], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + len(keys))
    raw = rng.random((len(keys), len(LABELS))).astype(np.float32)
    return raw / raw.sum(axis=1, keepdims=True)


def good_batch(keys: list[str], top_k: int = 3, extra=None, seed: int = 0) -> TagBatch:
    scores = scores_for(keys, seed)
    return TagBatch.from_selection(
        keys, [f"/src/{key}" for key in keys], select_tags(scores, top_k=top_k), scores, extra
    )


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    table = pads.dataset(path).to_table() if path.is_dir() else pq.read_table(path)
    return table.to_pylist()


def writer_for(layout, *, rank: int = 0, extra_schema=None, **kwargs) -> UnitPartWriter:
    schema = schema_with_metadata(table_schema(extra_schema), {"model": "m"})
    return UnitPartWriter(layout.work_dir, schema, LABELS, run=layout.run, rank=rank, **kwargs)


def commit(writer: UnitPartWriter, unit: int, **kept) -> None:
    writer.commit(UnitEnd(unit, None, kept.get("parts", ()), kept.get("rows", 0), kept.get("errors", 0),
                          kept.get("drop", {})))


def finish(layout, units) -> tuple[int, int]:
    return finish_units(layout.output, layout.kind, layout.work_dir, units, {"model": "m"}, table_schema())


# -- formats ----------------------------------------------------------------------------------


def test_parquet_rows_schema_and_metadata(tmp_path):
    out = tmp_path / "tags.parquet"
    extra_schema = pa.schema([pa.field("id", pa.int64())])
    batches = [
        good_batch(["a", "b"], extra={"id": [1, 2]}),
        TagBatch.from_failures(["bad"], ["/src/bad"], ["truncated"], {"id": [3]}),
    ]
    meta = {"model": "ViT-B-16", "labels": LABELS, "thresholds": None, "version": "0.1.0"}
    assert write_tag_table(out, LABELS, {0: batches}, all_scores=True, extra_schema=extra_schema, metadata=meta) == out
    table = pq.read_table(out)
    assert table.schema.names == ["key", "source", "tags", "error", "scores", "id"]
    tag_type = pa.struct([pa.field("label", pa.string()), pa.field("score", pa.float32())])
    assert pa.types.is_list(table.schema.field("tags").type) and table.schema.field("tags").type.value_type == tag_type
    assert table.schema.field("scores").type.value_type == pa.float32()
    rows = table.to_pylist()
    scores = scores_for(["a", "b"])
    for row, expected in zip(rows[:2], scores):
        assert row["error"] is None
        order = np.argsort(-expected, kind="stable")[:3]
        assert [tag["label"] for tag in row["tags"]] == [LABELS[i] for i in order]
        assert [tag["score"] for tag in row["tags"]] == pytest.approx(expected[order].tolist())
        assert row["scores"] == pytest.approx(expected.tolist())
    assert rows[2] == {"key": "bad", "source": "/src/bad", "tags": [], "error": "truncated", "scores": None, "id": 3}
    stored = read_table_metadata(out)
    assert {name: stored[name] for name in meta} == meta


def test_jsonl_rows_match_parquet_and_have_a_sidecar(tmp_path):
    units = {0: [good_batch(["a", "b", "c"]), TagBatch.from_failures(["x"], ["/src/x"], ["not an image"])]}
    parquet_rows = read_rows(write_tag_table(tmp_path / "t.parquet", LABELS, units, all_scores=True))
    jsonl_path = write_tag_table(
        tmp_path / "t.jsonl", LABELS, units, all_scores=True, metadata={"model": "m", "cmd": "ramtag tag"}
    )
    jsonl_rows = read_rows(jsonl_path)
    assert [row["key"] for row in jsonl_rows] == [row["key"] for row in parquet_rows]
    for ours, reference in zip(jsonl_rows, parquet_rows):
        # printed floats read back as the very same float32 values
        assert [np.float32(t["score"]) for t in ours["tags"]] == [np.float32(t["score"]) for t in reference["tags"]]
        assert [t["label"] for t in ours["tags"]] == [t["label"] for t in reference["tags"]]
        assert ours["error"] == reference["error"]
        if reference["scores"] is not None:
            assert np.array_equal(np.float32(ours["scores"]), np.float32(reference["scores"]))
    assert read_table_metadata(jsonl_path)["cmd"] == "ramtag tag"
    assert json.loads((tmp_path / "t.jsonl.meta.json").read_text())["model"] == "m"


def test_stdout_streams_json_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stream = io.StringIO()
    units = {0: [good_batch(["a"])], 1: [TagBatch.from_failures(["b"], ["/src/b"], ["empty file"])]}
    assert write_tag_table("-", LABELS, units, stdout=stream) is None
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["key"] for line in lines] == ["a", "b"]
    assert lines[1]["error"] == "empty file" and lines[1]["tags"] == []
    assert list(tmp_path.iterdir()) == []


def test_directory_output_is_a_partitioned_dataset(tmp_path):
    out = tmp_path / "tags"
    units = {unit: [good_batch([f"k{2 * unit}", f"k{2 * unit + 1}"])] for unit in range(3)}
    write_tag_table(f"{out}/", LABELS, units, part_rows=2)
    parts = sorted(path.name for path in out.glob("*.parquet"))
    assert len(parts) == 3 and all(name.startswith("part-u") for name in parts)
    assert sorted(row["key"] for row in read_rows(out)) == [f"k{i}" for i in range(6)]
    assert read_table_metadata(out)["model"] == "m"
    assert pads.dataset(out).count_rows() == 6


# -- nothing final before the end, kills, retries, ranks ---------------------------------------


def test_output_appears_only_when_every_unit_is_committed(tmp_path):
    out = tmp_path / "tags.parquet"
    layout = prepare_output(out)
    writer = writer_for(layout, part_rows=1, row_group_rows=1)
    writer.write(good_batch(["a", "b"]), [0, 0])
    commit(writer, 0)
    writer.write(good_batch(["c"]), [1])  # unit 1 ends uncommitted: a kill mid-unit
    writer.close()
    assert not out.exists() and layout.work_dir.name == ".tags.parquet.parts"
    assert sorted(latest_entries(layout.work_dir)) == [0] and latest_entries(layout.work_dir)[0].rows == 2
    with pytest.raises(OutputError, match=r"1 work unit\(s\) did not finish; the committed parts are kept"):
        finish(layout, [0, 1])
    assert not out.exists()
    assert finish(layout, [0]) == (2, 0)
    assert [row["key"] for row in read_rows(out)] == ["a", "b"]


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    sys.path.insert(0, {repo!r})
    from ramtag.data.layout import prepare_output
    from ramtag.data.parts import UnitPartWriter
    from ramtag.data.rows import TagBatch, schema_with_metadata, table_schema
    from ramtag.data.units import UnitEnd
    from ramtag.selection import select_tags

    labels = ["cat", "dog", "car", "tree", "sky"]
    layout = prepare_output({out!r})
    writer = UnitPartWriter(layout.work_dir, schema_with_metadata(table_schema(), {{}}), labels, run=layout.run,
                            part_rows=4, row_group_rows=2)
    for start in range(0, 22, 2):  # units of four rows: 0-3 are unit 0, ... 20-21 are unit 5
        keys = [f"img{{i:03d}}" for i in range(start, start + 2)]
        scores = np.full((2, 5), 0.2, dtype=np.float32)
        writer.write(TagBatch.from_selection(keys, keys, select_tags(scores, top_k=1)), [start // 4] * 2)
        if start % 4 == 2 and start < 20:  # units 0 to 4 end; 5 never does
            writer.commit(UnitEnd(start // 4, None, (), 0, 0, {{}}))
    deadline = time.time() + 20
    while writer.units_committed < 5 and time.time() < deadline:  # rows of an open part are not saved
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_killed_writer_leaves_committed_units_whole_and_exactly_once_after_the_rest(tmp_path):
    out = tmp_path / "tags.parquet"
    script = KILLED_RUN.format(repo=str(REPO), out=str(out))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()
    assert not out.exists()
    work_dir = tmp_path / ".tags.parquet.parts"
    assert any(path.name.startswith(".tmp-") for path in work_dir.iterdir())  # the part open at the kill
    entries = latest_entries(work_dir)
    assert sorted(entries) == [0, 1, 2, 3, 4] and all(entry.rows == 4 for entry in entries.values())

    layout = prepare_output(out, resume=True)
    writer = writer_for(layout)
    writer.write(good_batch(["img020", "img021"]), [5, 5])  # the unit in flight at the kill, redone
    commit(writer, 5)
    writer.close()
    finish(layout, list(range(6)))
    keys = [row["key"] for row in read_rows(out)]
    assert sorted(keys) == [f"img{i:03d}" for i in range(22)]


def test_resume_extends_a_finished_output(tmp_path):
    out = tmp_path / "tags.jsonl"
    write_tag_table(out, LABELS, {0: [good_batch(["a", "b"])]}, identity={"vocabulary": "v1"})
    write_tag_table(out, LABELS, {1: [good_batch(["c"])]}, resume=True, identity={"vocabulary": "v1"})
    assert sorted(row["key"] for row in read_rows(out)) == ["a", "b", "c"]
    with pytest.raises(OutputError, match="different vocabulary"):
        prepare_output(out, resume=True, identity={"vocabulary": "v2"})


def test_a_retried_unit_keeps_its_good_rows_and_replaces_its_error_rows(tmp_path):
    out = tmp_path / "tags.parquet"
    layout = prepare_output(out)
    writer = writer_for(layout)
    writer.write(good_batch(["a"]), [0])
    writer.write(TagBatch.from_failures(["b"], ["/src/b"], ["cannot read: Input/output error"]), [0])
    commit(writer, 0)
    writer.close()
    first = latest_entries(layout.work_dir)[0]
    assert (first.rows, first.errors) == (2, 1)

    layout = prepare_output(out, resume=True)  # as --retry-errors: keep the unit's part less the error row's key
    writer = writer_for(layout)
    writer.write(good_batch(["b"]), [0])
    commit(writer, 0, parts=tuple(first.parts), rows=1, drop={first.parts[0]: ["b"]})
    writer.close()
    assert finish(layout, [0]) == (2, 0)
    rows = {row["key"]: row for row in read_rows(out)}
    assert len(rows) == 2 and rows["b"]["error"] is None and rows["b"]["tags"]


def test_two_ranks_write_their_units_and_rank_zero_assembles(tmp_path):
    out = tmp_path / "tags.parquet"
    layout = prepare_output(out)
    writers = [writer_for(layout, rank=0), writer_for(layout, rank=1)]
    writers[0].write(good_batch(["a", "c"]), [0, 0])
    commit(writers[0], 0)
    writers[1].write(good_batch(["b", "d"]), [1, 1])
    writers[0].close()
    with pytest.raises(OutputError, match=r"1 work unit\(s\) did not finish"):
        finish(layout, [0, 1])
    commit(writers[1], 1)
    writers[1].close()
    finish(layout, [0, 1])
    assert sorted(row["key"] for row in read_rows(out)) == ["a", "b", "c", "d"]


def test_a_failing_writer_thread_is_reported(tmp_path):
    schema = pa.schema([pa.field("id", pa.int64())])
    writer = writer_for(prepare_output(tmp_path / "t.parquet"), extra_schema=schema)
    writer.write(good_batch(["a"], extra={"id": ["not a number"]}), [0])
    with pytest.raises(OutputError, match="writing the output failed"):
        writer.close()


def test_loader_batches_flow_into_the_table_with_every_input_once(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from ramtag.data.units import UnitDataset, UnitTask, collate_unit_records, plan_units
    from tests.io_fixtures import write_image

    for index in range(5):
        write_image(tmp_path / "photos" / f"{index}.png", index)
    (tmp_path / "photos" / "5.png").write_bytes(b"broken")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,id\n" + "".join(f"{tmp_path}/photos/{i}.png,{i * 10}\n" for i in range(6)))
    layout = prepare_output(tmp_path / "tags.parquet")
    plan = plan_units([str(manifest)], layout.work_dir, keep_columns=["id"], unit_rows=3)

    def features(img) -> torch.Tensor:  # a stand-in model input: mean colour
        return torch.from_numpy(np.asarray(img, dtype=np.float32).mean(axis=(0, 1)))

    schema = schema_with_metadata(table_schema(plan.extra_schema), {"model": "m"})
    writer = UnitPartWriter(layout.work_dir, schema, LABELS[:3], run=layout.run)
    tasks = [UnitTask(unit) for unit in plan.units]
    loader = DataLoader(UnitDataset(tasks, layout.work_dir, plan.listing, features), batch_size=4,
                        collate_fn=collate_unit_records, num_workers=2)
    for batch in loader:
        if batch.images is not None:
            scores = batch.images.softmax(dim=1)
            writer.write(
                TagBatch.from_selection(batch.keys, batch.sources, select_tags(scores, top_k=2), extra=batch.extra),
                batch.units,
            )
        writer.write(
            TagBatch.from_failures(batch.failed_keys, batch.failed_sources, batch.failed_errors, batch.failed_extra),
            batch.failed_units,
        )
        for end in batch.ended:
            writer.commit(end)
    writer.close()
    finish_units(layout.output, "parquet", layout.work_dir, [unit.id for unit in plan.units], {},
                 table_schema(plan.extra_schema))
    rows = {row["key"]: row for row in read_rows(tmp_path / "tags.parquet")}
    assert len(plan.units) == 2 and len(rows) == 6  # every input once, over two units
    assert {key: row["id"] for key, row in rows.items()} == {f"{tmp_path}/photos/{i}.png": i * 10 for i in range(6)}
    assert rows[f"{tmp_path}/photos/5.png"]["error"] == "not an image"
    assert all(len(row["tags"]) == 2 for key, row in rows.items() if row["error"] is None)
