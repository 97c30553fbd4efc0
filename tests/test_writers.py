"""Tag tables: formats, metadata, atomic output, refusal, resume after a kill, multi-rank merge,
tag selection and thresholds files."""

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

from ramtag.data.thresholds import read_thresholds, write_thresholds
from ramtag.data.writers import (
    TagBatch,
    TagTableWriter,
    attach_output,
    count_rows,
    finalize_output,
    output_kind,
    prepare_output,
    read_table_metadata,
)
from ramtag.errors import DataError, OutputError, UsageError, VocabularyError
from ramtag.selection import select_tags

LABELS = ["cat", "dog", "car", "tree", "sky"]
REPO = Path(__file__).resolve().parents[1]


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


def run_once(output, batches, *, all_scores=False, extra_schema=None, metadata=None, **layout_kwargs) -> Path | None:
    layout = prepare_output(output, **layout_kwargs)
    writer = TagTableWriter(
        layout, LABELS, metadata=metadata or {"model": "m"}, all_scores=all_scores, extra_schema=extra_schema
    )
    for batch in batches:
        writer.write(batch)
    return writer.finalize()


# -- selection --------------------------------------------------------------------------------


def reference_selection(row: np.ndarray, top_k: int, limits: np.ndarray) -> list[tuple[int, float]]:
    ranked = sorted(range(len(row)), key=lambda index: (-row[index], index))
    if top_k:
        ranked = ranked[:top_k]
    return [(index, float(row[index])) for index in ranked if row[index] >= limits[index]]


@pytest.mark.parametrize("top_k", [0, 1, 3, 9])
@pytest.mark.parametrize("mode", ["none", "global", "per_label"])
def test_select_tags_matches_a_plain_reference(top_k, mode):
    scores = scores_for(["a"] * 7, seed=3)
    scores[0, 1] = scores[0, 3]  # a tie: the lower label index comes first
    per_label = np.array([0.1, 0.3, 0.0, np.inf, 0.2], dtype=np.float32)
    kwargs, limits = {}, np.full(len(LABELS), -np.inf, dtype=np.float32)
    if mode == "global":
        kwargs, limits = {"threshold": 0.2}, np.full(len(LABELS), 0.2, dtype=np.float32)
    elif mode == "per_label":
        kwargs, limits = {"per_label": per_label}, per_label
    selection = select_tags(scores, top_k=top_k, **kwargs)
    for index, row in enumerate(scores):
        assert selection.row(index) == reference_selection(row, top_k, limits)


def test_selection_may_leave_an_image_without_tags():
    selection = select_tags(np.array([[0.5, 0.5, 0, 0, 0], [0.1, 0.2, 0.3, 0.2, 0.2]]), top_k=2, threshold=0.4)
    assert selection.counts.tolist() == [2, 0]


# -- formats ----------------------------------------------------------------------------------


def test_parquet_rows_schema_and_metadata(tmp_path):
    out = tmp_path / "tags.parquet"
    extra_schema = pa.schema([pa.field("id", pa.int64())])
    batches = [
        good_batch(["a", "b"], extra={"id": [1, 2]}),
        TagBatch.from_failures(["bad"], ["/src/bad"], ["truncated"], {"id": [3]}),
    ]
    meta = {"model": "ViT-B-16", "labels": LABELS, "thresholds": None, "version": "0.1.0"}
    assert run_once(out, batches, all_scores=True, extra_schema=extra_schema, metadata=meta) == out
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
    batches = [good_batch(["a", "b", "c"]), TagBatch.from_failures(["x"], ["/src/x"], ["not an image"])]
    parquet_rows = read_rows(run_once(tmp_path / "t.parquet", batches, all_scores=True))
    jsonl_path = run_once(tmp_path / "t.jsonl", batches, all_scores=True, metadata={"model": "m", "cmd": "ramtag tag"})
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


def test_stdout_streams_json_lines(tmp_path):
    stream = io.StringIO()
    assert prepare_output("-") is None
    writer = TagTableWriter(None, LABELS, stdout=stream)
    writer.write(good_batch(["a"]))
    writer.write(TagBatch.from_failures(["b"], ["/src/b"], ["empty file"]))
    assert writer.finalize() is None
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["key"] for line in lines] == ["a", "b"]
    assert lines[1]["error"] == "empty file" and lines[1]["tags"] == []
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="stdout cannot be resumed"):
        prepare_output("-", resume=True)


def test_directory_output_is_a_partitioned_dataset(tmp_path):
    out = tmp_path / "tags"
    layout = prepare_output(f"{out}/")
    writer = TagTableWriter(layout, LABELS, metadata={"model": "m"}, rows_per_part=2, row_group_rows=2)
    for start in range(0, 6, 2):
        writer.write(good_batch([f"k{start}", f"k{start + 1}"]))
    writer.finalize()
    parts = sorted(path.name for path in out.glob("*.parquet"))
    assert len(parts) == 3 and all(name.startswith("part-") for name in parts)
    assert sorted(row["key"] for row in read_rows(out)) == [f"k{i}" for i in range(6)]
    assert read_table_metadata(out)["model"] == "m"
    assert count_rows(out) == 6


def test_output_kinds():
    assert output_kind("-") == "stdout"
    assert output_kind("a/b.parquet") == "parquet"
    assert output_kind("a/b.JSONL") == "jsonl"
    assert output_kind("a/b/") == "dataset"
    with pytest.raises(UsageError, match="cannot tell the output format"):
        output_kind("tags.csv")


# -- atomicity, refusal, resume ---------------------------------------------------------------


def test_output_appears_only_on_completion(tmp_path):
    out = tmp_path / "tags.parquet"
    layout = prepare_output(out)
    writer = TagTableWriter(layout, LABELS, rows_per_part=1, row_group_rows=1)
    writer.write(good_batch(["a", "b"]))
    writer.close()
    assert not out.exists() and layout.work_dir.name == ".tags.parquet.parts"
    assert len(layout.part_files()) >= 1
    finalize_output(layout)
    assert out.exists() and not layout.work_dir.exists()
    assert [path.name for path in tmp_path.iterdir()] == ["tags.parquet"]


def test_existing_output_is_refused_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "tags.jsonl"
    run_once(out, [good_batch(["a"])])
    with pytest.raises(OutputError, match="exists; pass --resume .* or --overwrite"):
        prepare_output(out)
    run_once(out, [good_batch(["z"])], overwrite=True)
    assert [row["key"] for row in read_rows(out)] == ["z"]
    with pytest.raises(UsageError):
        prepare_output(out, resume=True, overwrite=True)


def test_only_ramtag_tables_are_resumed_or_replaced(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "NOTES.md").write_text("mine")
    (folder / "cat.jpg").write_bytes(b"jpeg")
    for flags in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(OutputError, match="files that ramtag did not write .*cat.jpg"):
            prepare_output(f"{folder}/", **flags)
    assert sorted(path.name for path in folder.iterdir()) == ["NOTES.md", "cat.jpg"]
    foreign = tmp_path / "manifest.jsonl"
    foreign.write_text('{"image": "a.jpg"}\n')
    with pytest.raises(OutputError, match="not a ramtag tag table"):
        prepare_output(foreign, resume=True)
    assert foreign.read_text() == '{"image": "a.jpg"}\n'
    dataset = tmp_path / "tags"
    run_once(f"{dataset}/", [good_batch(["a"])])
    layout = prepare_output(f"{dataset}/", resume=True)  # a folder ramtag wrote is extended
    assert layout.finished_keys() == {"a"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_output(f"{empty}/", resume=True) is not None


def test_interrupted_parts_are_refused_without_resume(tmp_path):
    out = tmp_path / "tags.parquet"
    writer = TagTableWriter(prepare_output(out), LABELS)
    writer.write(good_batch(["a"]))
    writer.close()  # no finalize: the run was interrupted
    with pytest.raises(OutputError, match="interrupted run left finished parts"):
        prepare_output(out)


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    sys.path.insert(0, {repo!r})
    from ramtag.data.writers import TagBatch, TagTableWriter, prepare_output
    from ramtag.selection import select_tags

    labels = ["cat", "dog", "car", "tree", "sky"]
    writer = TagTableWriter(prepare_output({out!r}), labels, rows_per_part=4, row_group_rows=2)
    for start in range(0, 22, 2):
        keys = [f"img{{i:03d}}" for i in range(start, start + 2)]
        scores = np.full((2, 5), 0.2, dtype=np.float32)
        writer.write(TagBatch.from_selection(keys, keys, select_tags(scores, top_k=1)))
    deadline = time.time() + 20
    while writer.rows_written < 22 and time.time() < deadline:  # rows of an open part are not saved
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_resume_after_kill_holds_every_input_exactly_once(tmp_path):
    out = tmp_path / "tags.parquet"
    script = KILLED_RUN.format(repo=str(REPO), out=str(out))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()
    assert not out.exists()
    work_dir = tmp_path / ".tags.parquet.parts"
    assert any(path.name.startswith(".tmp-") for path in work_dir.iterdir())  # the part open at the kill
    all_keys = {f"img{i:03d}" for i in range(22)}

    layout = prepare_output(out, resume=True)
    done = layout.finished_keys()
    assert done and done < all_keys and len(done) == 20  # five finished parts of four rows
    writer = TagTableWriter(layout, LABELS)
    missing = sorted(all_keys - done)
    writer.write(good_batch(missing))
    writer.finalize()
    keys = [row["key"] for row in read_rows(out)]
    assert sorted(keys) == sorted(all_keys) and len(keys) == len(all_keys)


def test_resume_extends_a_finished_output(tmp_path):
    out = tmp_path / "tags.jsonl"
    run_once(out, [good_batch(["a", "b"])], identity={"vocabulary": "v1"})
    layout = prepare_output(out, resume=True, identity={"vocabulary": "v1"})
    assert layout.finished_keys() == {"a", "b"}
    writer = TagTableWriter(layout, LABELS)
    writer.write(good_batch(["c"]))
    writer.finalize()
    assert sorted(row["key"] for row in read_rows(out)) == ["a", "b", "c"]
    with pytest.raises(OutputError, match="different vocabulary"):
        prepare_output(out, resume=True, identity={"vocabulary": "v2"})


def test_resume_of_an_interrupted_run_checks_its_identity(tmp_path):
    out = tmp_path / "tags.parquet"
    writer = TagTableWriter(prepare_output(out, identity={"top_k": 5}), LABELS)
    writer.write(good_batch(["a"]))
    writer.close()
    with pytest.raises(OutputError, match="started with a different top_k"):
        prepare_output(out, resume=True, identity={"top_k": 3})


def test_retried_errors_are_replaced_by_good_rows(tmp_path):
    out = tmp_path / "tags.parquet"
    writer = TagTableWriter(prepare_output(out), LABELS)
    writer.write(good_batch(["a"]))
    writer.write(TagBatch.from_failures(["b"], ["/src/b"], ["cannot read: Input/output error"]))
    writer.close()
    layout = prepare_output(out, resume=True)
    assert layout.finished_keys(retry_errors=True) == {"a"}
    writer = TagTableWriter(layout, LABELS)
    writer.write(good_batch(["b"]))
    writer.finalize()
    rows = {row["key"]: row for row in read_rows(out)}
    assert len(rows) == 2 and rows["b"]["error"] is None and rows["b"]["tags"]


def test_two_ranks_write_parts_and_rank_zero_merges(tmp_path):
    out = tmp_path / "tags.parquet"
    layout = prepare_output(out)
    other = attach_output(out)
    assert other == layout
    writers = [TagTableWriter(layout, LABELS, rank=0), TagTableWriter(other, LABELS, rank=1)]
    writers[0].write(good_batch(["a", "c"]))
    writers[1].write(good_batch(["b", "d"]))
    writers[0].close()
    with pytest.raises(OutputError, match=r"rank\(s\) 1 did not finish"):
        finalize_output(layout, world_size=2)
    writers[1].close()
    finalize_output(layout, world_size=2)
    assert sorted(row["key"] for row in read_rows(out)) == ["a", "b", "c", "d"]


def test_a_failing_writer_thread_is_reported(tmp_path):
    schema = pa.schema([pa.field("id", pa.int64())])
    writer = TagTableWriter(prepare_output(tmp_path / "t.parquet"), LABELS, extra_schema=schema)
    writer.write(good_batch(["a"], extra={"id": ["not a number"]}))
    with pytest.raises(OutputError, match="writing the output failed"):
        writer.close()


# -- thresholds files -------------------------------------------------------------------------


def test_thresholds_file_round_trip(tmp_path):
    path = tmp_path / "thresholds.tsv"
    values = np.array([0.05, 0.125, np.inf, 1e-4, 0.3], dtype=np.float32)
    write_thresholds(
        path, LABELS, values, vocabulary_fingerprint="v" * 16, model_fingerprint="m" * 16, info={"objective": "f1"}
    )
    parsed = read_thresholds(path)
    assert parsed.info == {"objective": "f1"}
    np.testing.assert_array_equal(parsed.for_vocabulary(LABELS, "v" * 16, "m" * 16), values)
    reordered = list(reversed(LABELS))
    np.testing.assert_array_equal(parsed.for_vocabulary(reordered, "v" * 16, "m" * 16), values[::-1])


def test_thresholds_for_another_vocabulary_or_model_are_refused(tmp_path):
    path = tmp_path / "thresholds.tsv"
    write_thresholds(path, LABELS, [0.1] * 5, vocabulary_fingerprint="aaaa", model_fingerprint="bbbb")
    parsed = read_thresholds(path)
    with pytest.raises(VocabularyError, match="another vocabulary"):
        parsed.for_vocabulary(LABELS, "cccc", "bbbb")
    with pytest.raises(VocabularyError, match="another model"):
        parsed.for_vocabulary(LABELS, "aaaa", "cccc")
    with pytest.raises(VocabularyError, match="no threshold for 1 label"):
        parsed.for_vocabulary(LABELS + ["moon"], "aaaa", "bbbb")


def test_malformed_thresholds_files(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("# vocabulary_fingerprint: a\ndog\t0.1\ncat 0.2\n")
    with pytest.raises(DataError, match=r"t.tsv:3: expected label<TAB>threshold"):
        read_thresholds(path)
    path.write_text("dog\t0.1\ndog\t0.2\n")
    with pytest.raises(DataError, match="t.tsv:2: label 'dog' repeats line 1"):
        read_thresholds(path)
    path.write_text("dog\thigh\n")
    with pytest.raises(DataError, match="not a number"):
        read_thresholds(path)
    path.write_text("dog\t0.1\n")
    with pytest.raises(VocabularyError, match="no '# vocabulary_fingerprint:' header"):
        read_thresholds(path).for_vocabulary(["dog"], "a", "b")


def test_loader_batches_flow_into_the_table_with_every_input_once(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from ramtag.data.records import FileDataset, collate_records
    from ramtag.data.sources import plan_inputs
    from tests.io_fixtures import write_image

    for index in range(5):
        write_image(tmp_path / "photos" / f"{index}.png", index)
    (tmp_path / "photos" / "5.png").write_bytes(b"broken")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,id\n" + "".join(f"{tmp_path}/photos/{i}.png,{i * 10}\n" for i in range(6)))
    plan = plan_inputs([str(manifest)], keep_columns=["id"])

    def features(img) -> torch.Tensor:  # a stand-in model input: mean colour
        return torch.from_numpy(np.asarray(img, dtype=np.float32).mean(axis=(0, 1)))

    layout = prepare_output(tmp_path / "tags.parquet")
    writer = TagTableWriter(layout, LABELS[:3], extra_schema=plan.extra_schema)
    for batch in DataLoader(FileDataset(plan.files, features), batch_size=4, collate_fn=collate_records, num_workers=2):
        if batch.images is not None:
            scores = batch.images.softmax(dim=1)
            writer.write(
                TagBatch.from_selection(batch.keys, batch.sources, select_tags(scores, top_k=2), extra=batch.extra)
            )
        writer.write(
            TagBatch.from_failures(batch.failed_keys, batch.failed_sources, batch.failed_errors, batch.failed_extra)
        )
    writer.finalize()
    rows = {row["key"]: row for row in read_rows(tmp_path / "tags.parquet")}
    assert sorted(rows) == sorted(plan.files["key"].to_pylist())
    assert {key: row["id"] for key, row in rows.items()} == {f"{tmp_path}/photos/{i}.png": i * 10 for i in range(6)}
    assert rows[f"{tmp_path}/photos/5.png"]["error"] == "not an image"
    assert all(len(row["tags"]) == 2 for key, row in rows.items() if row["error"] is None)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "tags.parquet"
    holder = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from ramtag.data.writers import prepare_output
        layout = prepare_output({str(out)!r})
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    first = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "ready"
        with pytest.raises(OutputError, match="another ramtag run is writing"):
            prepare_output(out, resume=True)
    finally:
        first.kill()  # SIGKILL: the system drops the lock with the process
        first.wait(timeout=30)
    layout = prepare_output(out, resume=True)
    assert layout is not None
    TagTableWriter(layout, LABELS).finalize()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tags.parquet"]  # no lock file left behind
