"""`ramtag tag --ray`: on a local Ray, the same table as one process, and exactly once after a kill."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ramtag.data.ledger import latest_entries
from tests.io_fixtures import image_bytes, image_shard, png_claiming_size, run_cli

LABELS = ["cat", "dog", "red car", "tree", "beach"]



@pytest.fixture(scope="module")
def local_ray():
    """One Ray for the module (its start costs ~10 s); the runs find it initialised and use it."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray-vocab") / "vocab.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


def tag_args(vocab: Path, out: Path, *extra) -> list:
    return ["tag", *extra, "--labels", vocab, "--model", "demo", "-o", out, "--all-scores", "-q", "--workers", 0]


def rows_by_key(path: Path) -> dict:
    rows = pq.read_table(path).to_pylist()
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "a key appears twice"
    return {row["key"]: row for row in rows}


def assert_same_table(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)  # the order within a unit is the order its rows were scored in
    for key, row in expected.items():
        other = got[key]
        assert other["error"] == row["error"] and other["source"] == row["source"]
        assert [t["label"] for t in other["tags"]] == [t["label"] for t in row["tags"]]
        if row["error"] is None:
            np.testing.assert_allclose(other["scores"], row["scores"], atol=1e-5)
        else:
            assert other["tags"] == [] and other["scores"] is None


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Good images and the bad-image zoo (truncated, not an image, empty, a decompression bomb, missing)."""
    root = tmp_path_factory.mktemp("ray-zoo")
    for seed in range(6):
        (root / f"img{seed}.png").write_bytes(image_bytes(seed))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "text.png").write_bytes(b"not a picture")
    (root / "empty.png").write_bytes(b"")
    (root / "bomb.png").write_bytes(png_claiming_size(200_000, 200_000))
    listing = root / "list.txt"
    names = sorted(p.name for p in root.glob("*.*g")) + ["missing.png"]
    listing.write_text("".join(f"{root / name}\n" for name in names))
    return listing


def test_a_ray_run_writes_the_table_one_process_writes(local_ray, zoo, vocab, tmp_path):
    plain, on_ray = tmp_path / "plain.parquet", tmp_path / "ray.parquet"
    assert run_cli(*tag_args(vocab, plain, f"@{zoo}")) == 3
    assert run_cli(*tag_args(vocab, on_ray, f"@{zoo}", "--ray", "local", "--batch-size", 3)) == 3
    expected = rows_by_key(plain)
    assert sum(row["error"] is not None for row in expected.values()) == 5  # the zoo's every animal
    assert_same_table(rows_by_key(on_ray), expected)


def sidecar_files(root: Path) -> dict[str, str]:
    """Every caption and XMP file under ``root``, by relative path."""
    found = sorted([*root.rglob("*.txt"), *root.rglob("*.xmp")])
    return {str(path.relative_to(root)): path.read_text(encoding="utf-8") for path in found}


def test_sidecars_and_labels_out_on_ray_are_those_of_one_process(local_ray, vocab, tmp_path):
    copies = {}
    for name in ("plain", "ray"):  # the same images twice: each run writes its sidecars beside its own copy
        folder = tmp_path / name / "photos"
        for seed in range(5):
            target = folder / ("sub" if seed % 2 else "") / f"img{seed}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(image_bytes(seed))
        (folder / "broken.png").write_bytes(b"not a picture")  # an error row: no sidecar
        copies[name] = folder
    options = ("--sidecars", "txt,xmp", "--prefix", "sks, ", "-k", 3)
    plain, on_ray = tmp_path / "plain" / "tags.parquet", tmp_path / "ray" / "tags.parquet"
    assert run_cli(*tag_args(vocab, plain, copies["plain"], *options, "--labels-out", tmp_path / "plain.labels")) == 3
    assert run_cli(*tag_args(vocab, on_ray, copies["ray"], *options, "--labels-out", tmp_path / "ray.labels",
                             "--ray", "local", "--batch-size", 2)) == 3
    expected = sidecar_files(copies["plain"])
    assert len(expected) == 2 * 5  # a caption and an XMP file for every image that could be tagged
    assert sidecar_files(copies["ray"]) == expected
    assert (tmp_path / "ray.labels").read_text() == (tmp_path / "plain.labels").read_text() == "".join(
        f"{label}\n" for label in LABELS
    )
    tags = {key: ([t["label"] for t in row["tags"]], row["error"]) for key, row in rows_by_key(plain).items()}
    assert {key: ([t["label"] for t in row["tags"]], row["error"]) for key, row in rows_by_key(on_ray).items()} == tags


def test_a_table_of_images_on_ray_gives_the_rows_of_one_process(local_ray, vocab, tmp_path):
    """--image-column inputs are planned as table units on Ray too (every row, a corrupt image as an error)."""
    images = [image_bytes(seed, "JPEG") for seed in range(5)] + [b"\xff\xd8 corrupt"]
    pq.write_table(pa.table({"jpg": images, "key": [f"k{index}" for index in range(6)]}), tmp_path / "t.parquet")
    plain, on_ray = tmp_path / "plain.parquet", tmp_path / "ray.parquet"
    table = ("--image-column", "jpg", "--key-column", "key")
    assert run_cli(*tag_args(vocab, plain, tmp_path / "t.parquet", *table)) == 3
    assert run_cli(*tag_args(vocab, on_ray, tmp_path / "t.parquet", *table, "--ray", "local")) == 3
    expected = rows_by_key(plain)
    assert sorted(expected) == [f"k{index}" for index in range(6)] and expected["k5"]["error"]
    assert_same_table(rows_by_key(on_ray), expected)


# ---------------------------------------------------------------------------------------------
# Kills. The last unit is a shard read through a pipe that waits for a gate file, so the run is reliably in
# flight, its earlier units committed, when the test kills or interrupts something; then the test opens the gate.

GOOD = 130  # two full units of 64 rows and one of 2, then the gated shard
UNITS = 4
# Ray bundles small blocks up to a batch before an actor takes them, so the end of a unit can wait for the
# next unit's rows: while the gate is shut, only the first unit is sure to be committed.


@pytest.fixture
def gated(tmp_path, vocab):
    """The inputs, the gate, and the table one process makes of them."""
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(GOOD):
        (folder / f"img{seed:03d}.png").write_bytes(image_bytes(seed))
    shard = image_shard(tmp_path / "late.tar", [f"late{index}" for index in range(5)], first_seed=500)
    gate = tmp_path / "gate-open"
    script = tmp_path / "gated.sh"
    script.write_text(f'until [ -e "{gate}" ]; do sleep 0.05; done\ncat "$1"\n')
    inputs = [folder, f"pipe:sh {script} {shard}"]
    gate.touch()
    plain = tmp_path / "plain.parquet"
    assert run_cli(*tag_args(vocab, plain, *inputs)) == 0
    gate.unlink()
    return inputs, gate, rows_by_key(plain)


def wait_for_units(work_dir: Path, count: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if work_dir.is_dir() and len(latest_entries(work_dir)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} units were not committed in {timeout} s")


def scorer_pids() -> list[int]:
    """Ray names its worker processes after what they run (``ray::MapWorker(…Scorer…)``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"MapWorker" in command and b"Scorer" in command:
            found.append(int(entry.name))
    return found


def test_a_killed_actor_is_restarted_and_every_input_is_written_once(local_ray, gated, vocab, tmp_path):
    inputs, gate, expected = gated
    out = tmp_path / "tags.parquet"
    killed: list[int] = []

    def kill_then_open_the_gate():
        try:
            wait_for_units(out.with_name(f".{out.name}.parts"), 1)
            for pid in scorer_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        finally:
            gate.touch()

    helper = threading.Thread(target=kill_then_open_the_gate, daemon=True)
    helper.start()
    assert run_cli(*tag_args(vocab, out, *inputs, "--ray", "local", "--batch-size", 16)) == 0
    helper.join(5)
    assert killed, "no scoring actor was found to kill"
    assert_same_table(rows_by_key(out), expected)
    assert not set(killed) & set(scorer_pids())  # the killed actor's work went on in a new one


def test_a_stopped_driver_resumes_to_exactly_once(local_ray, gated, vocab, tmp_path):
    from ramtag.data.sidecars import sidecar_path

    inputs, gate, expected = gated
    out = tmp_path / "tags.parquet"
    work_dir = out.with_name(f".{out.name}.parts")
    captions = tmp_path / "captions"
    resumed = threading.Event()

    def stop_at_the_gate():
        try:
            wait_for_units(work_dir, 1)
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's pre-emption, while the shard's unit is in flight
            resumed.wait(60)  # never a hang: were the stop lost, the run finishes and the asserts say so
        finally:
            gate.touch()

    helper = threading.Thread(target=stop_at_the_gate, daemon=True)
    helper.start()
    # appended captions show that the rows redone after the stop get their sidecars again, each tag once
    args = tag_args(vocab, out, *inputs, "--ray", "local", "--sidecars", "txt", "--sidecar-dir", captions,
                    "--sidecar-mode", "append")
    assert run_cli(*args) == 130
    gate.touch()  # lets a shard reader that Ray did not stop finish
    assert not out.exists() and 1 <= len(latest_entries(work_dir)) < UNITS
    assert run_cli(*args, "--resume") == 0
    resumed.set()
    helper.join(10)
    assert_same_table(rows_by_key(out), expected)
    for key, row in expected.items():
        caption = sidecar_path("txt", key, None, captions).read_text()
        assert caption == ", ".join(tag["label"] for tag in row["tags"]) + "\n"
    assert len(list(captions.rglob("*.txt"))) == len(expected)


# ---------------------------------------------------------------------------------------------
# Without Ray's machinery


def test_the_driver_writes_a_row_that_a_retried_task_sends_twice_once(tmp_path):
    from ramtag.data.rows import table_schema
    from ramtag.data.units import UnitEnd
    from ramtag.engine.ray_run import _UnitCollector
    from ramtag.engine.reporter import ImageProgress

    class Writer:
        def __init__(self):
            self.keys, self.commits = [], []

        def write(self, batch, units):
            self.keys.extend(batch.keys)

        def commit(self, end):
            self.commits.append((end.unit, len(self.keys)))
            self.sidecars_before_commit = len(sidecars.rows)

    import pickle

    def table(seqs, end=None):
        n = len(seqs)
        columns = {
            "unit": [7] * n, "seq": list(seqs), "key": [f"k{s}" for s in seqs], "source": ["s"] * n,
            "error": [None] * n, "extra": [pickle.dumps({})] * n, "end": [b""] * n,
            "tag_labels": [[0]] * n, "tag_scores": [[0.5]] * n,
        }
        if end is not None:
            for name, value in (("unit", 7), ("seq", -1), ("key", ""), ("source", ""), ("error", None),
                                ("extra", b""), ("end", pickle.dumps(end)), ("tag_labels", []), ("tag_scores", [])):
                columns[name].append(value)
        return pa.table(columns)

    class Sidecars:
        def __init__(self):
            self.rows, self.first_failure = [], None

        def write(self, keys, sources, tags):
            self.rows.extend(zip(keys, tags))

        def counts(self):
            return {"written": len(self.rows)}

    assert table_schema() is not None
    writer, sidecars = Writer(), Sidecars()
    collector = _UnitCollector(writer, ImageProgress(None, "t", quiet=True), False, ["cat"], sidecars)
    collector.take(table([0, 1]))
    collector.take(table([0, 1, 2], end=(UnitEnd(7, None, (), 0, 0, {}), 3)))  # a retry resends 0 and 1
    assert writer.keys == ["k0", "k1", "k2"] and writer.commits == [(7, 3)]
    assert collector.duplicates == 2
    assert sidecars.rows == [("k0", ["cat"]), ("k1", ["cat"]), ("k2", ["cat"])]  # each kept row once, none resent
    assert writer.sidecars_before_commit == 3  # a unit commits only after its rows' sidecars are written
    assert collector.tally().sidecars == {"written": 3}


def test_ray_options_are_checked_before_a_model_loads(vocab, tmp_path, capsys):
    for bad in (["--ray-actors", "0:2"], ["--ray-actors", "3:1"], ["--ray-actors", "x"],
                ["--ray-cpus-per-task", "0"], ["--save-maps", str(tmp_path / "maps")]):
        assert run_cli(*tag_args(vocab, tmp_path / "t.parquet", tmp_path, "--ray", "local", *bad)) == 2
        assert "loading" not in capsys.readouterr().err
    assert run_cli(*tag_args(vocab, tmp_path / "t.parquet", tmp_path, "--ray", "local", "--save-maps", tmp_path)) == 2
    assert "region scores, which stay in the Ray actors" in capsys.readouterr().err
    assert run_cli(*tag_args(vocab, tmp_path / "t.parquet", tmp_path, "--ray-actors", "2")) == 2
    assert "--ray-actors needs --ray" in capsys.readouterr().err


def test_without_ray_the_option_names_the_extra_before_a_model_loads(vocab, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as on the core install
    assert run_cli(*tag_args(vocab, tmp_path / "t.parquet", tmp_path, "--ray", "auto")) == 2
    err = capsys.readouterr().err
    assert "pip install 'ramtag[ray]'" in err and "loading" not in err and len(err.strip().splitlines()) == 1
