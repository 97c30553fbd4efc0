"""`ramtag tag` and `ramtag vocab` end to end on a tiny checkpoint: inputs, outputs, failures, resume, ranks."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import build_tiny_checkpoint
from tests.io_fixtures import run_cli

LABELS = ["cat", "dog", "red car", "tree"]


def _png(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for index in range(5):
        _png(index).save(root / ("sub" if index % 2 else "") / f"img{index}.PNG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "notes.txt").write_text("not an image, not listed")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# test vocabulary\n" + "\n".join(LABELS) + "\n\n")
    return root, vocab


def _rows(path) -> list[dict]:
    return sorted(pq.read_table(path).to_pylist(), key=lambda row: row["key"])


def test_folder_to_parquet_with_an_error_row(photos, tiny_checkpoint, tmp_path, capsys):
    root, vocab = photos
    out = tmp_path / "tags.parquet"
    code = run_cli(
        "tag", root, "--labels", vocab, "-c", tiny_checkpoint, "-o", out, "--workers", 0, "-k", 3, "--all-scores"
    )
    assert code == 3  # some inputs failed, the rest is written
    assert "broken.jpg" in capsys.readouterr().err
    rows = _rows(out)
    assert [r["key"] for r in rows] == [
        "broken.jpg",
        "img0.PNG",
        "img2.PNG",
        "img4.PNG",
        "sub/img1.PNG",
        "sub/img3.PNG",
    ]
    broken = rows[0]
    assert broken["error"] and broken["tags"] == []
    for row in rows[1:]:
        assert row["error"] is None
        scores = [t["score"] for t in row["tags"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        # the tags are the top 3 of the full score vector, in vocabulary order
        best = np.argsort(-np.asarray(row["scores"]), kind="stable")[:3]
        assert [t["label"] for t in row["tags"]] == [LABELS[i] for i in best]
        assert sum(row["scores"]) == pytest.approx(1.0, abs=1e-5)
    meta = json.loads(pq.read_schema(out).metadata[b"ramtag"])
    assert meta["vocabulary"] == LABELS and meta["model_fingerprint"] and meta["ramtag_version"]
    assert "tag" in meta["command_line"]


def test_file_names_that_are_not_utf8_are_tagged_under_escaped_keys(photos, tiny_checkpoint, tmp_path):
    root, vocab = photos
    odd = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name, as Python reads it from a UTF-8 file system
    shutil.copy(root / "img0.PNG", root / odd)
    shard = tmp_path / "latin.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as archive:
        for name in (odd, "plain.png"):
            archive.add(root / "img0.PNG", arcname=name)
    out = tmp_path / "tags.parquet"
    code = run_cli("tag", root, shard, "--labels", vocab, "-c", tiny_checkpoint, "-o", out, "--workers", 0)
    assert code == 3  # broken.jpg only
    rows = {row["key"]: row for row in _rows(out)}
    plain = rows["img0.PNG"]["tags"]
    for key in ("caf\\xe9.png", "latin.tar/caf\\xe9", "latin.tar/plain"):  # the same picture as img0.PNG
        assert rows[key]["error"] is None, key
        assert [t["label"] for t in rows[key]["tags"]] == [t["label"] for t in plain], key
        assert [t["score"] for t in rows[key]["tags"]] == pytest.approx([t["score"] for t in plain], abs=1e-5)


def test_mixed_inputs_keys_and_carried_columns(photos, tiny_checkpoint, tmp_path, monkeypatch):
    root, vocab = photos
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'img0.PNG'}\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"id,url,image\n7,http://x/2,{root / 'img2.PNG'}\n8,http://x/9,{root / 'missing.png'}\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{root / 'sub' / 'img1.PNG'}\n"))
    out = tmp_path / "mixed.jsonl"
    code = run_cli(
        "tag",
        f"@{listing}",
        "-",
        manifest,
        "--path-column",
        "image",
        "--keep-columns",
        "id,url",
        "--labels",
        vocab,
        "-c",
        tiny_checkpoint,
        "-o",
        out,
        "--workers",
        0,
    )
    assert code == 3  # the manifest names a missing file
    rows = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {
        str(root / "img0.PNG"),
        str(root / "sub" / "img1.PNG"),
        str(root / "img2.PNG"),
        str(root / "missing.png"),
    }
    assert rows[str(root / "img2.PNG")]["id"] == 7 and rows[str(root / "img2.PNG")]["url"] == "http://x/2"
    assert rows[str(root / "missing.png")]["error"]
    sidecar = json.loads((tmp_path / "mixed.jsonl.meta.json").read_text())
    assert sidecar["vocabulary"] == LABELS


def _write_shard(path, start: int, count: int) -> None:
    with tarfile.open(path, "w") as archive:
        for index in range(start, start + count):
            buffer = io.BytesIO()
            _png(index).save(buffer, format="PNG")
            data = buffer.getvalue()
            info = tarfile.TarInfo(f"sample{index:03d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_webdataset_shards_by_brace_pattern(photos, tiny_checkpoint, tmp_path, capsys):
    _, vocab = photos
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "000000.tar", 0, 3)
    _write_shard(shards / "000001.tar", 3, 2)
    code = run_cli(
        "tag",
        f"{shards}/{{000000..000001}}.tar",
        "--labels",
        vocab,
        "-c",
        tiny_checkpoint,
        "-o",
        "-",
        "--workers",
        0,
        "-q",
    )
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["key"] for r in rows) == [f"000000.tar/sample{i:03d}" for i in range(3)] + [
        f"000001.tar/sample{i:03d}" for i in range(3, 5)
    ]
    assert all(r["error"] is None and len(r["tags"]) == 4 for r in rows)
    assert run_cli("tag", f"{shards}/{{000005..000006}}.tar", "--labels", vocab, "-c", tiny_checkpoint, "-o", "-") == 2


def test_existing_output_is_refused_and_dataset_output(photos, tiny_checkpoint, tmp_path, capsys):
    root, vocab = photos
    out = tmp_path / "tags.parquet"
    out.write_bytes(b"precious")
    assert run_cli("tag", root, "--labels", vocab, "-c", tiny_checkpoint, "-o", out) == 2
    assert "--resume" in capsys.readouterr().err and out.read_bytes() == b"precious"
    folder = f"{tmp_path / 'dataset'}/"
    assert run_cli("tag", root / "sub", "--labels", vocab, "-c", tiny_checkpoint, "-o", folder, "--workers", 0) == 0
    table = pq.read_table(folder)
    assert sorted(table.column("key").to_pylist()) == ["img1.PNG", "img3.PNG"]


def test_interrupted_run_resumes_without_duplicates(photos, tiny_checkpoint, tmp_path, monkeypatch):
    from ramtag.engine.runtime import Runtime

    root, vocab = photos
    out = tmp_path / "tags.parquet"
    real_score = Runtime.score
    calls = {"n": 0}

    def score_then_interrupt(self, images, features, *rest):  # rest: autocast dtype, compiled vision
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_score(self, images, features, *rest)

    monkeypatch.setattr(Runtime, "score", score_then_interrupt)
    args = [
        "tag",
        root,
        "--labels",
        vocab,
        "-c",
        tiny_checkpoint,
        "-o",
        out,
        "--workers",
        0,
        "--batch-size",
        1,
        "--part-rows",
        1,
    ]
    assert run_cli(*args) == 130
    assert not out.exists()  # nothing half-written appears under the output's name
    monkeypatch.setattr(Runtime, "score", real_score)
    calls["n"] = 0
    assert run_cli(*args) == 2  # unfinished parts are not silently discarded
    assert run_cli(*args, "--resume") == 3  # the broken image still fails
    rows = _rows(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 6


def test_vocabulary_file_round_trip_and_refusal(photos, tiny_checkpoint, tmp_path, capsys):
    root, vocab = photos
    encoded = tmp_path / "vocab.rtv"
    assert run_cli("vocab", "encode", vocab, "-o", encoded, "-c", tiny_checkpoint) == 0
    assert run_cli("vocab", "show", encoded) == 0
    assert "red car" in capsys.readouterr().out
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run_cli("tag", root / "sub", "--labels", vocab, "-c", tiny_checkpoint, "-o", a, "--workers", 0) == 0
    assert run_cli("tag", root / "sub", "--labels", encoded, "-c", tiny_checkpoint, "-o", b, "--workers", 0) == 0
    assert a.read_text() == b.read_text()
    other = build_tiny_checkpoint(tmp_path / "other.safetensors", seed=1)
    capsys.readouterr()
    assert run_cli("tag", root / "sub", "--labels", encoded, "-c", other, "-o", tmp_path / "c.jsonl") == 2
    assert "another model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cat\ndog\ncat\n", "line"),
        ("# nothing\n\n", "empty"),
        ("cat\n" + "very " * 20 + "long label\n", "bad.txt:2: label"),
    ],
)
def test_bad_vocabularies_name_the_line(photos, tiny_checkpoint, tmp_path, capsys, content, message):
    root, _ = photos
    vocab = tmp_path / "bad.txt"
    vocab.write_text(content)
    assert run_cli("tag", root, "--labels", vocab, "-c", tiny_checkpoint, "-o", tmp_path / "x.jsonl") == 2
    assert message in capsys.readouterr().err


def test_label_features_are_cached(tiny_checkpoint):
    from ramtag.engine.runtime import load_runtime
    from ramtag.engine.vocabulary import encode_vocabulary

    runtime = load_runtime(tiny_checkpoint, device="cpu")
    first = encode_vocabulary(runtime, LABELS)
    second = encode_vocabulary(runtime, LABELS)
    assert not first.from_cache and second.from_cache
    assert first.fingerprint == second.fingerprint
    np.testing.assert_array_equal(first.features.numpy(), second.features.numpy())


def test_thresholds_select_and_foreign_files_are_refused(photos, tiny_checkpoint, tmp_path, capsys):
    from ramtag.data.thresholds import write_thresholds
    from ramtag.engine.runtime import load_runtime
    from ramtag.engine.vocabulary import encode_vocabulary

    root, vocab = photos
    runtime = load_runtime(tiny_checkpoint, device="cpu")
    vocabulary = encode_vocabulary(runtime, LABELS)
    good = tmp_path / "t.tsv"
    write_thresholds(
        good,
        LABELS,
        [0.0, float("inf"), 0.0, float("inf")],
        vocabulary_fingerprint=vocabulary.fingerprint,
        model_fingerprint=runtime.fingerprint,
    )
    out = tmp_path / "t.jsonl"
    assert (
        run_cli(
            "tag",
            root / "sub",
            "--labels",
            vocab,
            "-c",
            tiny_checkpoint,
            "-o",
            out,
            "--thresholds",
            good,
            "--workers",
            0,
            "-k",
            0,
        )
        == 0
    )
    for row in map(json.loads, out.read_text().splitlines()):
        assert {t["label"] for t in row["tags"]} == {"cat", "red car"}
    foreign = tmp_path / "f.tsv"
    write_thresholds(foreign, LABELS, [0.1] * 4, vocabulary_fingerprint="0" * 16, model_fingerprint=runtime.fingerprint)
    assert (
        run_cli(
            "tag",
            root / "sub",
            "--labels",
            vocab,
            "-c",
            tiny_checkpoint,
            "-o",
            tmp_path / "u.jsonl",
            "--thresholds",
            foreign,
        )
        == 2
    )


@pytest.mark.slow
def test_two_processes_equal_one(photos, tiny_checkpoint, tmp_path):
    root, vocab = photos
    (root / "c_broken.jpg").write_bytes(b"not a picture")  # second in key order: rank 1 of 2 reads it
    single, double = tmp_path / "one.parquet", tmp_path / "two.parquet"
    common = [
        "tag",
        str(root),
        "--labels",
        str(vocab),
        "-c",
        str(tiny_checkpoint),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--all-scores",
    ]
    assert run_cli(*common, "-q", "-o", single) == 3
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "-m",
        "ramtag",
    ]
    result = subprocess.run(
        torchrun + common + ["-o", str(double)], capture_output=True, text=True, env=env, timeout=240
    )
    assert result.returncode != 0 and "rank" in result.stderr  # exit status 3 from rank 0: two images are broken
    for key in ("broken.jpg", "c_broken.jpg"):  # every rank reports the inputs it could not read
        assert f"ramtag: {key}: " in result.stderr, result.stderr[-3000:]
    one, two = _rows(single), _rows(double)
    assert [r["key"] for r in one] == [r["key"] for r in two]
    for a, b in zip(one, two):
        assert a["error"] == b["error"]
        assert [t["label"] for t in a["tags"]] == [t["label"] for t in b["tags"]]
        if a["scores"] is not None:
            np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)


def test_an_error_line_stays_one_line_when_the_key_holds_a_newline(photos, tiny_checkpoint, tmp_path, capsys):
    _, vocab = photos
    manifest = tmp_path / "images.jsonl"
    manifest.write_text(json.dumps({"path": "new\nline.png"}) + "\n")
    assert (
        run_cli("tag", manifest, "--labels", vocab, "-c", tiny_checkpoint, "-o", tmp_path / "t.jsonl", "--workers", 0)
        == 3
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if "line.png" in line]
    assert lines == [lines[0]] and "new\\nline.png" in lines[0]
