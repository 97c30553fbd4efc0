"""Where a tag table goes (:mod:`ramtag.data.layout`): output kinds, refusals of existing or foreign outputs and of
interrupted work, the identity a resumed run must keep, and one run at a time per output."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ramtag.data.layout import output_kind, prepare_output
from ramtag.data.parts import UnitPartWriter
from ramtag.data.rows import TagBatch, schema_with_metadata, table_schema
from ramtag.errors import OutputError, UsageError
from tests.io_fixtures import write_tag_table

LABELS = ["cat", "dog"]
REPO = Path(__file__).resolve().parents[2]


def rows(keys: list[str]) -> dict:
    return {0: [TagBatch.from_failures(keys, keys, ["not an image"] * len(keys))]}


def write_uncommitted(layout) -> None:
    """Rows of a unit that never ends: the parts an interrupted run leaves."""
    writer = UnitPartWriter(layout.work_dir, schema_with_metadata(table_schema(), {}), LABELS, run=layout.run)
    writer.write(TagBatch.from_failures(["a"], ["a"], ["x"]), [0])
    writer.close()


def test_output_kinds():
    assert output_kind("-") == "stdout"
    assert output_kind("a/b.parquet") == "parquet"
    assert output_kind("a/b.JSONL") == "jsonl"
    assert output_kind("a/b/") == "dataset"
    with pytest.raises(UsageError, match="cannot tell the output format"):
        output_kind("tags.csv")
    assert prepare_output("-") is None
    with pytest.raises(UsageError, match="stdout cannot be resumed"):
        prepare_output("-", resume=True)


def test_existing_output_is_refused_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "tags.jsonl"
    write_tag_table(out, LABELS, rows(["a"]))
    with pytest.raises(OutputError, match="exists; pass --resume .* or --overwrite"):
        prepare_output(out)
    write_tag_table(out, LABELS, rows(["z"]), overwrite=True)
    assert out.read_text().count('"key"') == 1 and '"z"' in out.read_text()
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
    write_tag_table(f"{dataset}/", LABELS, rows(["a"]))
    layout = prepare_output(f"{dataset}/", resume=True)  # a folder ramtag wrote is extended: its ledger's next run
    assert layout is not None and layout.run == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_output(f"{empty}/", resume=True) is not None


def test_interrupted_parts_are_refused_without_resume(tmp_path):
    out = tmp_path / "tags.parquet"
    write_uncommitted(prepare_output(out))
    with pytest.raises(OutputError, match="interrupted run left finished parts"):
        prepare_output(out)


def test_resume_of_an_interrupted_run_checks_its_identity(tmp_path):
    out = tmp_path / "tags.parquet"
    write_uncommitted(prepare_output(out, identity={"top_k": 5}))
    with pytest.raises(OutputError, match="started with a different top_k"):
        prepare_output(out, resume=True, identity={"top_k": 3})


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "tags.parquet"
    holder = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from ramtag.data.layout import prepare_output
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
    write_tag_table(out, LABELS, rows(["a"]), resume=True)
    assert out.exists() and not (tmp_path / ".tags.parquet.lock").exists()  # no lock file left behind
