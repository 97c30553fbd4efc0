"""Inputs and outputs on object storage, against a real S3 API server (moto's) on loopback: never a mock of
the client. Shards, lists and manifests read from a bucket give the table that local files give; a partitioned
output written to a bucket opens in pyarrow straight from it; a killed run resumes to an exactly-once table; the
credentials never reach an output or a message."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ramtag.data import storage
from tests.io_fixtures import image_bytes, run_cli, write_image, write_shard

moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the S3 API server")

REPO = Path(__file__).resolve().parents[2]
LABELS = ["cat", "dog", "red car", "tree"]
SECRET = "ramtag-test-secret-Zq9x7Kp2"  # what must never appear in an output or a message
_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "ramtag-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture()
def bucket(s3_endpoint, monkeypatch):
    """A fresh bucket, with the environment a user sets for it (credentials from the environment only)."""
    import pyarrow.fs as pafs

    for name, value in s3_environment(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    storage._filesystem_for.cache_clear()
    name = f"ramtag-test-{os.getpid()}-{next(_buckets)}"
    admin = pafs.S3FileSystem(
        access_key="ramtag-test-key",
        secret_key=SECRET,
        endpoint_override=s3_endpoint,
        region="us-east-1",
        allow_bucket_creation=True,
    )
    admin.create_dir(name)
    yield name
    storage._filesystem_for.cache_clear()


def s3fs_of(endpoint: str):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        access_key="ramtag-test-key", secret_key=SECRET, endpoint_override=endpoint, region="us-east-1"
    )


def put(endpoint: str, url: str, data: bytes) -> None:
    with s3fs_of(endpoint).open_output_stream(url.removeprefix("s3://")) as stream:
        stream.write(data)


def put_tree(endpoint: str, local: Path, url: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            put(endpoint, f"{url.rstrip('/')}/{path.relative_to(local).as_posix()}", path.read_bytes())


@pytest.fixture()
def vocab(tmp_path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


def tag(inputs, vocab, checkpoint, out, *extra) -> int:
    items = inputs if isinstance(inputs, list) else [inputs]
    return run_cli("tag", *items, "--labels", vocab, "-c", checkpoint, "-o", out, "--workers", 0, "-q", *extra)


def rows_by_key(path) -> dict[str, dict]:
    table = pads.dataset(path, format="parquet").to_table() if Path(path).is_dir() else pq.read_table(path)
    rows = table.drop_columns(["source"]).to_pylist()
    return {row["key"]: row for row in rows}


def shards_of(folder: Path, count: int = 3, per_shard: int = 3) -> Path:
    for index in range(count):
        write_shard(
            folder / f"{index:06d}.tar",
            [(f"s{index}-{i}", {"jpg": image_bytes(10 * index + i, "JPEG")}) for i in range(per_shard)],
        )
    return folder


# -- inputs -------------------------------------------------------------------------------------


def test_shards_from_a_bucket_give_the_local_table(tmp_path, vocab, tiny_checkpoint, bucket, s3_endpoint):
    local = shards_of(tmp_path / "shards")
    put_tree(s3_endpoint, local, f"s3://{bucket}/shards")
    assert tag(f"{local}/*.tar", vocab, tiny_checkpoint, tmp_path / "local.parquet") == 0
    by_glob, by_braces = tmp_path / "glob.parquet", tmp_path / "braces.parquet"
    assert tag(f"s3://{bucket}/shards/*.tar", vocab, tiny_checkpoint, by_glob) == 0
    assert tag(f"s3://{bucket}/shards/{{000000..000002}}.tar", vocab, tiny_checkpoint, by_braces) == 0
    expected = rows_by_key(tmp_path / "local.parquet")
    assert len(expected) == 9
    assert rows_by_key(by_glob) == expected
    assert rows_by_key(by_braces) == expected
    sources = pq.read_table(by_glob)["source"].to_pylist()
    assert all(source.startswith(f"s3://{bucket}/shards/") for source in sources)


def test_a_manifest_a_list_and_a_prefix_in_a_bucket_give_the_local_table(
    tmp_path, vocab, tiny_checkpoint, bucket, s3_endpoint
):
    import pyarrow as pa

    photos = tmp_path / "photos"
    names = [f"img{i}.png" for i in range(4)]
    for index, name in enumerate(names):
        write_image(photos / name, index)
    put_tree(s3_endpoint, photos, f"s3://{bucket}/photos")
    urls = [f"s3://{bucket}/photos/{name}" for name in names]
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": urls, "caption": [f"c{i}" for i in range(4)]}), buffer)
    put(s3_endpoint, f"s3://{bucket}/manifest.parquet", buffer.getvalue().to_pybytes())
    put(s3_endpoint, f"s3://{bucket}/list.txt", "\n".join(urls).encode() + b"\n")

    local_manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table({"path": [str(photos / n) for n in names], "caption": [f"c{i}" for i in range(4)]}), local_manifest
    )
    assert tag(local_manifest, vocab, tiny_checkpoint, tmp_path / "local.parquet", "--keep-columns", "caption") == 0
    local = rows_by_key(tmp_path / "local.parquet")

    def scores(rows):  # keys differ (a URL against a path); what each image got must not
        return sorted((row["caption"], row["tags"], row["error"]) for row in rows.values())

    remote_manifest = tmp_path / "remote.parquet"
    assert (
        tag(f"s3://{bucket}/manifest.parquet", vocab, tiny_checkpoint, remote_manifest, "--keep-columns", "caption")
        == 0
    )
    remote = rows_by_key(remote_manifest)
    assert sorted(remote) == urls and scores(remote) == scores(local)

    listed = tmp_path / "listed.parquet"
    assert tag(f"@s3://{bucket}/list.txt", vocab, tiny_checkpoint, listed) == 0
    assert sorted(rows_by_key(listed)) == urls

    prefix = tmp_path / "prefix.parquet"
    assert tag(f"s3://{bucket}/photos/", vocab, tiny_checkpoint, prefix) == 0
    assert sorted(rows_by_key(prefix)) == names  # keys relative to the prefix, as for a local folder
    assert tag(photos, vocab, tiny_checkpoint, tmp_path / "folder.parquet") == 0
    folder = rows_by_key(tmp_path / "folder.parquet")
    assert {k: (r["tags"], r["error"]) for k, r in rows_by_key(prefix).items()} == {
        k: (r["tags"], r["error"]) for k, r in folder.items()
    }


def test_unreadable_urls_give_one_clear_line(tmp_path, vocab, tiny_checkpoint, bucket, capsys):
    out = tmp_path / "tags.parquet"
    capsys.readouterr()
    assert tag(f"s3://no-such-bucket-{bucket}/shards/*.tar", vocab, tiny_checkpoint, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "Traceback" not in err[0]
    assert tag(f"s3://{bucket}/missing.parquet", vocab, tiny_checkpoint, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ramtag: error: s3://{bucket}/missing.parquet: no such manifest"] or (
        len(err) == 1 and "no such manifest" in err[0]
    )
    assert not out.exists()


def test_an_image_url_in_a_list_that_cannot_be_read_is_an_error_row(tmp_path, vocab, tiny_checkpoint, bucket):
    listing = tmp_path / "list.txt"
    listing.write_text(f"s3://{bucket}/nothing-here.png\n")
    out = tmp_path / "tags.jsonl"
    assert tag(f"@{listing}", vocab, tiny_checkpoint, out) == 3
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["key"] == f"s3://{bucket}/nothing-here.png" and "no such object" in row["error"]
    assert "No such file or directory" not in row["error"]


def test_no_credentials_is_one_line(tmp_path, vocab, tiny_checkpoint, bucket, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    storage._filesystem_for.cache_clear()
    capsys.readouterr()
    assert tag(f"s3://{bucket}/shards/*.tar", vocab, tiny_checkpoint, tmp_path / "tags.parquet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "AWS_ACCESS_KEY_ID" in err[0]


def test_credentials_in_a_url_are_refused_without_repeating_them(tmp_path, vocab, tiny_checkpoint, bucket, capsys):
    capsys.readouterr()
    url = f"s3://ramtag-test-key:{SECRET}@{bucket}/shards/*.tar"
    assert tag(url, vocab, tiny_checkpoint, tmp_path / "tags.parquet") == 2
    err = capsys.readouterr().err
    assert "credentials in URLs are not accepted" in err and SECRET not in err


def test_missing_object_storage_support_names_the_extra(monkeypatch, tmp_path):
    import builtins

    from ramtag.data.records import FileDataset
    from ramtag.data.sources import plan_inputs

    real_import = builtins.__import__

    def without_fsspec(name, *args, **kwargs):
        if name == "fsspec" or name.startswith("fsspec."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_fsspec)
    storage._filesystem_for.cache_clear()
    with pytest.raises(storage.MissingSupport, match=r"pip install 'ramtag\[remote\]'"):
        plan_inputs(["memory-store://bucket/shards/000000.tar"])
    import pyarrow.fs

    monkeypatch.delattr(pyarrow.fs, "S3FileSystem")  # a pyarrow built without S3
    with pytest.raises(storage.MissingSupport, match=r"^s3:// URLs need .*pip install 'ramtag\[remote\]'"):
        plan_inputs(["s3://bucket/shards/000000.tar"])
    listing = tmp_path / "list.txt"
    listing.write_text("memory-store://bucket/a.png\n")
    files = plan_inputs([f"@{listing}"]).files
    record = FileDataset(files, lambda image: image)[0]
    assert "remote URLs in lists are read through the object-storage extra" in record.error
    assert "ramtag[remote]" in record.error


def test_bucket_globs_stay_within_one_level(bucket, s3_endpoint):
    for name in ("a/x.tar", "a/y.tar", "a/deeper/z.tar", "b/x.tar"):
        put(s3_endpoint, f"s3://{bucket}/{name}", b"")
    assert storage.glob(f"s3://{bucket}/a/*.tar") == [f"s3://{bucket}/a/x.tar", f"s3://{bucket}/a/y.tar"]
    assert storage.glob(f"s3://{bucket}/**/x.tar") == [f"s3://{bucket}/a/x.tar", f"s3://{bucket}/b/x.tar"]
    assert storage.glob(f"s3://{bucket}/?/x.tar") == [f"s3://{bucket}/a/x.tar", f"s3://{bucket}/b/x.tar"]


# -- outputs ------------------------------------------------------------------------------------


def bucket_objects(endpoint: str, prefix: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    fs = s3fs_of(endpoint)
    infos = fs.get_file_info(pafs.FileSelector(prefix.removeprefix("s3://"), recursive=True, allow_not_found=True))
    return {info.path: fs.open_input_stream(info.path).read() for info in infos if info.type == pafs.FileType.File}


def inputs_of(tmp_path: Path) -> list[Path]:
    photos = tmp_path / "photos"
    for index in range(5):
        write_image(photos / f"img{index}.png", index)
    shard = write_shard(tmp_path / "extra.tar", [(f"x{i}", {"jpg": image_bytes(20 + i, "JPEG")}) for i in range(3)])
    return [photos, shard]


def test_a_dataset_output_in_a_bucket_opens_from_the_bucket(
    tmp_path, vocab, tiny_checkpoint, bucket, s3_endpoint, monkeypatch, capfd
):
    monkeypatch.chdir(tmp_path)
    inputs = inputs_of(tmp_path)
    assert tag(inputs, vocab, tiny_checkpoint, tmp_path / "local.parquet") == 0
    expected = rows_by_key(tmp_path / "local.parquet")
    out = f"s3://{bucket}/runs/tags/"
    assert tag(inputs, vocab, tiny_checkpoint, out, "--part-rows", 1) == 0
    assert not (tmp_path / "s3:").exists()  # never a local folder named after the URL

    fs = s3fs_of(s3_endpoint)
    table = pads.dataset(f"{bucket}/runs/tags/", filesystem=fs, format="parquet").to_table()
    assert {row["key"]: row for row in table.drop_columns(["source"]).to_pylist()} == expected
    objects = bucket_objects(s3_endpoint, f"{bucket}/runs/tags/")
    names = sorted(name.rsplit("/", 1)[-1] for name in objects)
    assert names[:2] == ["_SUCCESS", "_manifest.json"] and all(n.startswith("part-u") for n in names[2:])
    manifest = json.loads(objects[f"{bucket}/runs/tags/_manifest.json"])
    assert manifest["rows"] == len(expected) and sorted(manifest["files"]) == names[2:]

    import polars as pl

    options = {
        "aws_endpoint_url": s3_endpoint,
        "aws_access_key_id": "ramtag-test-key",
        "aws_secret_access_key": SECRET,
        "aws_region": "us-east-1",
        "aws_allow_http": "true",
    }
    frame = pl.read_parquet(f"s3://{bucket}/runs/tags/*.parquet", storage_options=options)
    assert sorted(frame["key"].to_list()) == sorted(expected)

    # Credentials never reach an object of the bucket (outputs, work folder, ledger) nor a message.
    everything = bucket_objects(s3_endpoint, bucket)
    assert everything and not [name for name, data in everything.items() if SECRET.encode() in data]
    metadata = pq.read_schema(fs.open_input_file(f"{bucket}/runs/tags/{names[2]}")).metadata
    assert b"ramtag" in metadata and SECRET.encode() not in b"".join(metadata.values())
    captured = capfd.readouterr()
    assert SECRET not in captured.err and SECRET not in captured.out

    # Done: refused without --resume, then --resume finds everything done, --overwrite rewrites it.
    assert tag(inputs, vocab, tiny_checkpoint, out) == 2
    assert "exists; pass --resume" in capfd.readouterr().err
    assert run_cli("tag", *inputs, "--labels", vocab, "-c", tiny_checkpoint, "-o", out, "--workers", 0, "--resume") == 0
    assert "0 failed, 8 already done" in capfd.readouterr().err
    assert tag(inputs, vocab, tiny_checkpoint, out, "--overwrite") == 0
    table = pads.dataset(f"{bucket}/runs/tags/", filesystem=fs, format="parquet").to_table()
    assert sorted(table["key"].to_pylist()) == sorted(expected)


@pytest.mark.parametrize("name", ["tags.parquet", "tags.jsonl"])
def test_a_single_file_output_in_a_bucket(tmp_path, vocab, tiny_checkpoint, bucket, s3_endpoint, name):
    inputs = inputs_of(tmp_path)
    local = tmp_path / name
    assert tag(inputs, vocab, tiny_checkpoint, local) == 0
    url = f"s3://{bucket}/out/{name}"
    assert tag(inputs, vocab, tiny_checkpoint, url, "--part-rows", 1) == 0
    objects = bucket_objects(s3_endpoint, f"{bucket}/out/")
    if name.endswith(".parquet"):
        remote = pq.read_table(s3fs_of(s3_endpoint).open_input_file(f"{bucket}/out/{name}"))
        assert sorted(remote.drop_columns(["source"]).to_pylist(), key=lambda r: r["key"]) == sorted(
            pq.read_table(local).drop_columns(["source"]).to_pylist(), key=lambda r: r["key"]
        )
    else:
        rows = [json.loads(line) for line in objects[f"{bucket}/out/{name}"].decode().splitlines()]
        local_keys = [json.loads(line)["key"] for line in local.read_text().splitlines()]
        assert sorted(row["key"] for row in rows) == sorted(local_keys)
        assert "vocabulary" in json.loads(objects[f"{bucket}/out/{name}.meta.json"])


def test_output_problems_are_one_line(tmp_path, vocab, tiny_checkpoint, bucket, s3_endpoint, capsys):
    import socket
    import time

    inputs = inputs_of(tmp_path)
    capsys.readouterr()
    assert tag(inputs, vocab, tiny_checkpoint, f"s3://missing-{bucket}/tags/") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert tag(inputs, vocab, tiny_checkpoint, f"s3://{bucket}/tags") == 2  # no format: a folder ends with /
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert tag(inputs, vocab, tiny_checkpoint, f"s3://{bucket}/") == 2
    assert "inside the bucket" in capsys.readouterr().err
    lease = {"host": f"not-{socket.gethostname()}", "pid": 1, "started": time.time(), "renewed": time.time()}
    put(s3_endpoint, f"s3://{bucket}/.tags.parts/lease.json", json.dumps(lease).encode())
    assert tag(inputs, vocab, tiny_checkpoint, f"s3://{bucket}/tags/") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another ramtag run" in err[0] and "lease" in err[0]
    assert not bucket_objects(s3_endpoint, f"{bucket}/tags/")


def test_duckdb_reads_the_output_from_the_bucket_when_httpfs_is_at_hand(
    tmp_path, vocab, tiny_checkpoint, bucket, s3_endpoint
):
    duckdb = pytest.importorskip("duckdb")
    connection = duckdb.connect()
    try:
        connection.execute("LOAD httpfs")
    except Exception:
        pytest.skip("DuckDB's httpfs extension is not installed, and this machine cannot download it")
    inputs = inputs_of(tmp_path)
    assert tag(inputs, vocab, tiny_checkpoint, f"s3://{bucket}/tags/") == 0
    host = s3_endpoint.removeprefix("http://")
    connection.execute(
        f"CREATE SECRET (TYPE s3, KEY_ID 'ramtag-test-key', SECRET '{SECRET}', ENDPOINT '{host}', "
        "URL_STYLE 'path', USE_SSL false, REGION 'us-east-1')"
    )
    keys = connection.sql(f"select key from read_parquet('s3://{bucket}/tags/*.parquet')").fetchall()
    assert len(keys) == 8


KILLED_REMOTE_TAG = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    import pyarrow.fs as pafs
    from ramtag.engine.runtime import Runtime, load_runtime
    from ramtag.engine.tag import TagOptions, run_tag

    fs, ledger = pafs.FileSystem.from_uri({ledger!r})
    real_score = Runtime.score
    calls = [0]

    def committed():
        found = fs.get_file_info(pafs.FileSelector(ledger, allow_not_found=True))
        return sum(1 for info in found if info.type == pafs.FileType.File)

    def score_then_die(self, images, features, *rest):  # rest: autocast dtype, compiled vision
        calls[0] += 1
        if calls[0] == 8:  # units 0..2 done (2 images each), unit 3 half done
            deadline = time.time() + 60
            while committed() < 3 and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_score(self, images, features, *rest)

    Runtime.score = score_then_die
    runtime = load_runtime({checkpoint!r}, device="cpu")
    options = TagOptions(inputs=[{folder!r}], labels={vocab!r}, output={out!r}, workers=0, batch_size=1,
                         unit_rows=2, part_rows=1, quiet=True)
    run_tag(options, runtime)
    """
)


def test_a_run_killed_mid_way_resumes_to_an_exactly_once_table_in_the_bucket(
    tmp_path, vocab, tiny_checkpoint, bucket, s3_endpoint
):
    from ramtag.data.remote_output import RemoteWork

    photos = tmp_path / "photos"
    keys = [f"img{i:03d}.png" for i in range(11)]
    for index, key in enumerate(keys):
        write_image(photos / key, index)
    out = f"s3://{bucket}/tags/"
    script = KILLED_REMOTE_TAG.format(
        repo=str(REPO),
        ledger=f"s3://{bucket}/.tags.parts/ledger",
        checkpoint=str(tiny_checkpoint),
        folder=str(photos),
        vocab=str(vocab),
        out=out,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300, env=env)
    assert result.returncode == -9, result.stderr.decode()[-3000:]
    assert not bucket_objects(s3_endpoint, f"{bucket}/tags/")  # readers see nothing uncommitted
    work = bucket_objects(s3_endpoint, f"{bucket}/.tags.parts/")
    assert f"{bucket}/.tags.parts/lease.json" in work  # left by the killed run; this host takes it over
    remote = RemoteWork(out, "dataset", str(tmp_path / "unused"))
    done = remote.latest()
    assert 3 <= len(done) < 6

    assert tag(photos, vocab, tiny_checkpoint, out, "--resume", "--batch-size", 1) == 0
    table = pads.dataset(f"{bucket}/tags/", filesystem=s3fs_of(s3_endpoint), format="parquet").to_table()
    found = table["key"].to_pylist()
    assert sorted(found) == keys and len(found) == len(set(found))
    after = remote.latest()
    assert all(after[unit].run == 0 for unit in done)  # committed units were not redone
    assert f"{bucket}/.tags.parts/lease.json" not in bucket_objects(s3_endpoint, f"{bucket}/.tags.parts/")
    parts = {name.rsplit("/", 1)[-1] for name in bucket_objects(s3_endpoint, f"{bucket}/tags/")}
    assert parts - {"_SUCCESS", "_manifest.json"} == {name for e in after.values() for name in e.parts}


def test_retried_errors_heal_in_a_bucket_output(tmp_path, vocab, tiny_checkpoint, bucket, s3_endpoint):
    photos = tmp_path / "photos"
    for index in range(4):
        write_image(photos / f"img{index}.png", index)
    (photos / "broken.png").write_bytes(b"not a png")
    out = f"s3://{bucket}/tags/"
    assert tag(photos, vocab, tiny_checkpoint, out) == 3
    write_image(photos / "broken.png", 99)  # whole again
    assert tag(photos, vocab, tiny_checkpoint, out, "--resume") == 3  # not retried without --retry-errors
    assert tag(photos, vocab, tiny_checkpoint, out, "--resume", "--retry-errors") == 0
    table = pads.dataset(f"{bucket}/tags/", filesystem=s3fs_of(s3_endpoint), format="parquet").to_table()
    rows = table.to_pylist()
    assert sorted(row["key"] for row in rows) == ["broken.png"] + [f"img{i}.png" for i in range(4)]
    assert all(row["error"] is None and row["tags"] for row in rows)


def test_resume_refuses_a_bucket_folder_that_ramtag_did_not_write(
    tmp_path, vocab, tiny_checkpoint, bucket, s3_endpoint, capsys
):
    put(s3_endpoint, f"s3://{bucket}/photos/holiday.jpg", b"someone's photo")
    capsys.readouterr()
    assert tag(inputs_of(tmp_path), vocab, tiny_checkpoint, f"s3://{bucket}/photos/", "--resume") == 2
    assert "did not write (holiday.jpg)" in capsys.readouterr().err
    assert tag(inputs_of(tmp_path), vocab, tiny_checkpoint, f"s3://{bucket}/photos/", "--overwrite") == 2
    assert "did not write (holiday.jpg)" in capsys.readouterr().err
    assert set(bucket_objects(s3_endpoint, f"{bucket}/photos/")) == {f"{bucket}/photos/holiday.jpg"}


@pytest.mark.slow
def test_two_ranks_write_one_table_to_a_bucket(tmp_path, vocab, tiny_checkpoint, bucket, s3_endpoint):
    import socket

    inputs = inputs_of(tmp_path)
    assert tag(inputs, vocab, tiny_checkpoint, tmp_path / "one.parquet") == 0
    expected = rows_by_key(tmp_path / "one.parquet")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        "-m",
        "ramtag",
    ]
    command = [
        "tag",
        *map(str, inputs),
        "--labels",
        str(vocab),
        "-c",
        str(tiny_checkpoint),
        "--workers",
        "0",
        "--device",
        "cpu",
        "-q",
        "-o",
        f"s3://{bucket}/tags/",
    ]
    # the static split, so that rank 1 surely commits units: claimed, rank 0 may take all of these tiny ones
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAMTAG_STATIC_UNITS": "1"}
    result = subprocess.run(torchrun + command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert SECRET not in result.stderr and SECRET not in result.stdout
    table = pads.dataset(f"{bucket}/tags/", filesystem=s3fs_of(s3_endpoint), format="parquet").to_table()
    found = table["key"].to_pylist()
    assert sorted(found) == sorted(expected) and len(found) == len(set(found))
    # Which images share a batch changes scores in the last digits (another matter): compare what was chosen.
    for row in table.to_pylist():
        assert {t["label"] for t in row["tags"]} == {t["label"] for t in expected[row["key"]]["tags"]}
    from ramtag.data.remote_output import RemoteWork

    ranks = {entry.rank for entry in RemoteWork(f"s3://{bucket}/tags/", "dataset", str(tmp_path)).latest().values()}
    assert ranks == {0, 1}  # both ranks committed units to the bucket's ledger
