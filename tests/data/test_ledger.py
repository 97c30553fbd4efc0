"""Work units and the ledger: crash-safe commits, resume that opens only what is left, error rows that heal,
dataset folders that any Parquet reader opens, and runs that find no image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ramtag.data.ledger import LedgerEntry, LedgerWriter, latest_entries, read_ledger_file
from ramtag.errors import OutputError
from tests.io_fixtures import image_bytes, run_cli, write_image, write_shard

REPO = Path(__file__).resolve().parents[2]
LABELS = ["cat", "dog", "red car", "tree"]


@pytest.fixture()
def vocab(tmp_path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


def photo_folder(root: Path, count: int) -> Path:
    for index in range(count):
        write_image(root / f"img{index:03d}.png", index)
    return root


def keys_of(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return [json.loads(line)["key"] for line in path.read_text().splitlines()]
    table = pads.dataset(path, format="parquet").to_table() if path.is_dir() else pq.read_table(path)
    return table.column("key").to_pylist()


def tag(inputs, vocab, checkpoint, out, *extra) -> int:
    items = inputs if isinstance(inputs, list) else [inputs]
    return run_cli("tag", *items, "--labels", vocab, "-c", checkpoint, "-o", out, "--workers", 0, "-q", *extra)


# -- the ledger file ----------------------------------------------------------------------------


def entry(unit: int, run: int = 0) -> LedgerEntry:
    return LedgerEntry(
        unit=unit, run=run, rank=0, parts=[f"part-u{unit:06d}-r{run:03d}-c000.parquet"], rows=3, errors=0
    )


def test_a_torn_last_line_is_ignored_and_a_bad_middle_line_is_not(tmp_path):
    writer = LedgerWriter(tmp_path, run=0, rank=0)
    for unit in range(3):
        writer.append(entry(unit))
    writer.close()
    with writer.path.open("a") as handle:  # a kill in the middle of the fourth line
        handle.write(entry(3).to_json()[:25])
    assert [e.unit for e in read_ledger_file(writer.path)] == [0, 1, 2]
    assert sorted(latest_entries(tmp_path)) == [0, 1, 2]
    lines = writer.path.read_text().split("\n")
    writer.path.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    with pytest.raises(OutputError, match=r"ledger-r000-rank000.jsonl:2: unreadable ledger line"):
        list(read_ledger_file(writer.path))


def test_the_newest_run_of_a_unit_is_its_state(tmp_path):
    first, second = LedgerWriter(tmp_path, 0, 0), LedgerWriter(tmp_path, 1, 1)
    first.append(entry(0, run=0))
    first.append(entry(1, run=0))
    second.append(entry(1, run=1))
    first.close()
    second.close()
    latest = latest_entries(tmp_path)
    assert latest[0].run == 0 and latest[1].run == 1
    assert sorted(latest_entries(tmp_path, before_run=1)[1].parts) == ["part-u000001-r000-c000.parquet"]


# -- kill and resume ----------------------------------------------------------------------------

KILLED_TAG = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from ramtag.engine.runtime import Runtime, load_runtime
    from ramtag.engine.tag import TagOptions, run_tag

    work = Path({work!r})
    real_score = Runtime.score
    calls = [0]

    def committed_lines():
        return sum(path.read_text().count("\\n") for path in work.glob("ledger-*.jsonl"))

    def score_then_die(self, images, features, *rest):  # rest: autocast dtype, compiled vision
        calls[0] += 1
        if calls[0] == 8:  # units 0..2 done (2 images each), unit 3 half done
            deadline = time.time() + 30
            while committed_lines() < 3 and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_score(self, images, features, *rest)

    Runtime.score = score_then_die
    runtime = load_runtime({checkpoint!r}, device="cpu")
    options = TagOptions(inputs=[{folder!r}], labels={vocab!r}, output={out!r}, workers=0, batch_size=1,
                         unit_rows=2, part_rows=1, quiet=True)
    run_tag(options, runtime)
    """
)


def test_a_killed_run_resumes_to_every_input_exactly_once(tmp_path, vocab, tiny_checkpoint):
    folder = photo_folder(tmp_path / "photos", 11)
    out = tmp_path / "tags.parquet"
    work = tmp_path / ".tags.parquet.parts"
    script = KILLED_TAG.format(
        repo=str(REPO),
        work=str(work),
        checkpoint=str(tiny_checkpoint),
        folder=str(folder),
        vocab=str(vocab),
        out=str(out),
    )
    env = {**os.environ, "RAMTAG_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300, env=env)
    assert result.returncode == -9, result.stderr.decode()[-3000:]
    assert not out.exists()
    done = latest_entries(work)
    assert len(done) >= 3 and len(done) < 6  # some units committed, some not
    in_flight = [path.name for path in work.glob("part-u000003-*")]
    assert in_flight and 3 not in done  # the half-done unit kept its committed part, without a ledger line

    assert tag(folder, vocab, tiny_checkpoint, out, "--resume", "--batch-size", 1) == 0
    keys = keys_of(out)
    assert sorted(keys) == [f"img{i:03d}.png" for i in range(11)] and len(keys) == len(set(keys))
    runs = {unit: e.run for unit, e in latest_entries(work).items()}
    assert all(runs[unit] == 0 for unit in done)  # done units were not redone
    assert set(in_flight) <= set(latest_entries(work)[3].parts)  # the rows committed before the kill are kept


def test_resume_after_completion_opens_no_shard(tmp_path, vocab, tiny_checkpoint, capsys):
    shards = tmp_path / "shards"
    for index in range(3):
        write_shard(shards / f"{index:06d}.tar", [(f"s{index}-{i}", {"jpg": image_bytes(i, "JPEG")}) for i in range(4)])
    out = tmp_path / "tags.jsonl"
    pattern = f"{shards}/*.tar"
    assert tag(pattern, vocab, tiny_checkpoint, out) == 0
    before = out.read_text()
    for path in shards.glob("*.tar"):
        path.unlink()
    capsys.readouterr()
    assert run_cli("tag", pattern, "--labels", vocab, "-c", tiny_checkpoint, "-o", out, "--resume") == 0
    assert "tagged 0 images, 0 failed, 12 already done" in capsys.readouterr().err
    assert out.read_text() == before


def test_resume_planning_reads_no_part_of_a_done_unit(tmp_path, vocab, tiny_checkpoint, monkeypatch):
    from ramtag.data.units import UnitDataset
    from ramtag.engine.output import InputOptions, RunOutput

    monkeypatch.setattr("ramtag.data.units.MIN_UNIT_ROWS", 1)  # six images in three units (four worker slots)
    folder = photo_folder(tmp_path / "photos", 6)
    out = tmp_path / "tags"
    assert tag(folder, vocab, tiny_checkpoint, f"{out}/", "--part-rows", 1, "--batch-size", 1) == 0
    work = tmp_path / ".tags.parts"
    entries = latest_entries(work)
    assert len(entries) == 3 and all(len(e.parts) == 2 for e in entries.values())  # 2 images a unit, 1 a part
    ledger = next(work.glob("ledger-*.jsonl"))
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(line for line in lines if json.loads(line)["unit"] != 2))  # unit 2 was in flight
    for unit, e in entries.items():
        if unit != 2:
            for name in e.parts:
                (work / name).write_bytes(b"not parquet: opening this part fails")

    identity = json.loads((work / "run.json").read_text())["identity"]
    output = RunOutput.open(f"{out}/", InputOptions([str(folder)]), resume=True, identity=identity)
    try:
        assert [task.unit.id for task in output.tasks] == [2]
        assert output.tasks[0].parts == tuple(entries[2].parts)
        assert output.done_rows == 4
        dataset = UnitDataset(output.tasks, output.work_dir, output.listing, lambda image: image)
        items = list(dataset)
        assert len(items) == 1 and items[0].kept_rows == 2  # its committed rows are kept, no image read again
    finally:
        output.release()


def test_a_worker_opens_one_unit_of_the_listing_through_a_footer_of_bytes_per_unit(tmp_path):
    """A Parquet listing of one row group per unit made every worker parse ~4 KB of footer a unit (400 MB at
    100,000 units, benchmarks/scale.py); the Arrow IPC listing's footer is 24 bytes a unit."""
    from ramtag.data.units import UnitDataset, UnitTask, plan_units

    names = [f"img{index:05d}.png" for index in range(3_000)]
    (tmp_path / "list.txt").write_text("".join(f"{tmp_path / name}\n" for name in names))
    plan = plan_units([f"@{tmp_path / 'list.txt'}"], tmp_path / "work", unit_rows=1)
    assert len(plan.units) == len(names)
    data = plan.listing.read_bytes()
    assert data.endswith(b"ARROW1")
    footer = int.from_bytes(data[-10:-6], "little")  # the footer's length precedes the closing magic
    assert footer / len(plan.units) < 64
    dataset = UnitDataset([UnitTask(plan.units[1234])], tmp_path / "work", plan.listing, lambda image: image)
    items = list(dataset)
    assert [item.key for item in items[:-1]] == [str(tmp_path / names[1234])] and items[-1].unit == 1234


# -- error rows heal --------------------------------------------------------------------------


def test_a_shard_cut_mid_stream_heals_to_exactly_its_samples(tmp_path, vocab, tiny_checkpoint, capsys):
    shard = write_shard(
        tmp_path / "shard.tar", [(f"{i:03d}", {"png": image_bytes(i, "PNG", size=(64, 64))}) for i in range(64)]
    )
    assert shard.stat().st_size > 500_000
    out = tmp_path / "tags.parquet"
    assert tag(f"pipe:head -c 500000 {shard}", vocab, tiny_checkpoint, out) == 3
    first = pq.read_table(out).to_pylist()
    assert "shard.tar/" in [row["key"] for row in first] and len(first) < 64
    assert tag(str(shard), vocab, tiny_checkpoint, out, "--resume") == 3  # done with a unit error: kept
    capsys.readouterr()
    assert tag(str(shard), vocab, tiny_checkpoint, out, "--resume", "--retry-errors") == 0
    rows = pq.read_table(out).to_pylist()
    assert sorted(row["key"] for row in rows) == [f"shard.tar/{i:03d}" for i in range(64)]
    assert all(row["error"] is None for row in rows)
    assert tag(str(shard), vocab, tiny_checkpoint, out, "--resume") == 0  # the status follows the final table


def test_retried_sample_errors_are_replaced(tmp_path, vocab, tiny_checkpoint):
    folder = photo_folder(tmp_path / "photos", 4)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "tags.jsonl"
    assert tag(folder, vocab, tiny_checkpoint, out) == 3
    write_image(folder / "broken.png", 99)  # the file is whole again
    assert tag(folder, vocab, tiny_checkpoint, out, "--resume") == 3  # not retried without --retry-errors
    assert tag(folder, vocab, tiny_checkpoint, out, "--resume", "--retry-errors") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["key"] for row in rows) == ["broken.png"] + [f"img{i:03d}.png" for i in range(4)]
    assert all(row["error"] is None and row["tags"] for row in rows)


def test_a_restarted_group_does_not_retry_what_its_first_start_retried(tmp_path, vocab, tiny_checkpoint, monkeypatch):
    folder = photo_folder(tmp_path / "photos", 3)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "tags.parquet"
    work = tmp_path / ".tags.parquet.parts"
    assert tag(folder, vocab, tiny_checkpoint, out) == 3

    def runs_of_entries() -> list[int]:
        return sorted(entry.run for entry in latest_entries(work).values())

    def start(job: str, restart: int, *extra: str) -> int:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
        return tag(folder, vocab, tiny_checkpoint, out, "--retry-errors", *extra)

    first = runs_of_entries()
    assert start("job-1", 0, "--resume") == 3  # the job's first start retries the broken image
    retried = runs_of_entries()
    assert retried != first
    assert start("job-1", 1) == 3  # its restart resumes by itself, and does not retry it again
    assert runs_of_entries() == retried
    assert start("job-2", 0, "--resume") == 3  # a new job does
    assert runs_of_entries() != retried
    assert sorted(keys_of(out)) == ["broken.png"] + [f"img{i:03d}.png" for i in range(3)]


# -- the dataset folder -----------------------------------------------------------------------


def test_a_dataset_folder_opens_in_pyarrow_duckdb_and_polars(tmp_path, vocab, tiny_checkpoint):
    import duckdb
    import polars as pl

    folder = photo_folder(tmp_path / "photos", 5)
    shard = write_shard(tmp_path / "extra.tar", [(f"x{i}", {"jpg": image_bytes(i, "JPEG")}) for i in range(3)])
    out = tmp_path / "tags"
    (tmp_path / f".tmp-tags-{12345}").mkdir()  # what an older ramtag left when killed while replacing the folder
    assert tag([folder, shard], vocab, tiny_checkpoint, f"{out}/") == 0
    names = sorted(path.name for path in out.iterdir())
    assert names[0] == "_SUCCESS" and all(name.startswith("part-u") for name in names[1:])
    assert not (tmp_path / ".tmp-tags-12345").exists()
    expected = sorted([f"img{i:03d}.png" for i in range(5)] + [f"extra.tar/x{i}" for i in range(3)])
    assert sorted(pads.dataset(out, format="parquet").to_table()["key"].to_pylist()) == expected
    assert sorted(pl.scan_parquet(f"{out}/").collect()["key"].to_list()) == expected
    found = duckdb.sql(f"select key from read_parquet('{out}/*.parquet') order by key").fetchall()
    assert [row[0] for row in found] == expected
    assert tag([folder, shard], vocab, tiny_checkpoint, f"{out}/", "--overwrite") == 0
    assert sorted(pl.scan_parquet(f"{out}/").collect()["key"].to_list()) == expected


# -- runs that find nothing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "is empty"),
        ({"000000.tar": b"", "000001.tar": b""}, "shards go in as '.*/\\*.tar'"),
        ({"data-00000-of-00001.arrow": b"", "dataset_info.json": b"{}"}, "Hugging Face save_to_disk"),
    ],
)
def test_a_run_that_finds_no_image_is_a_usage_error(tmp_path, vocab, tiny_checkpoint, capsys, layout, message):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, data in layout.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "tags.parquet"
    assert tag(folder, vocab, tiny_checkpoint, out) == 2
    err = capsys.readouterr().err
    assert "no images to tag" in err and re.search(message, err), err
    assert not out.exists() and not (tmp_path / ".tags.parquet.parts").exists()
    assert tag(folder, vocab, tiny_checkpoint, out, "--allow-empty") == 0
    assert pq.read_table(out).num_rows == 0
