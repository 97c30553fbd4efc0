"""Inputs and outputs on object storage, against a real S3 API server (moto's) on loopback: never a mock of
the client. Shards, lists and manifests read from a bucket give the table that local files give; a partitioned
output written to a bucket opens in pyarrow straight from it; a killed run resumes to an exactly-once table; the
credentials never reach an output or a message."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ramtag.cli import main
from ramtag.data import storage
from tests.io_fixtures import image_bytes, write_image, write_shard

moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the S3 API server")

REPO = Path(__file__).resolve().parents[1]
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
        access_key="ramtag-test-key", secret_key=SECRET, endpoint_override=s3_endpoint, region="us-east-1",
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


def run_cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


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
    pq.write_table(pa.table({"path": [str(photos / n) for n in names], "caption": [f"c{i}" for i in range(4)]}),
                   local_manifest)
    assert tag(local_manifest, vocab, tiny_checkpoint, tmp_path / "local.parquet", "--keep-columns", "caption") == 0
    local = rows_by_key(tmp_path / "local.parquet")

    def scores(rows):  # keys differ (a URL against a path); what each image got must not
        return sorted((row["caption"], row["tags"], row["error"]) for row in rows.values())

    remote_manifest = tmp_path / "remote.parquet"
    assert tag(f"s3://{bucket}/manifest.parquet", vocab, tiny_checkpoint, remote_manifest,
               "--keep-columns", "caption") == 0
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


def test_missing_object_storage_support_names_the_extra(monkeypatch, tmp_path):
    import builtins

    from ramtag.data.sources import FileDataset, plan_inputs

    real_import = builtins.__import__

    def without_fsspec(name, *args, **kwargs):
        if name == "fsspec" or name.startswith("fsspec."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_fsspec)
    storage._filesystem_for.cache_clear()
    with pytest.raises(storage.MissingSupport, match=r"pip install 'ramtag\[remote\]'"):
        plan_inputs(["memory-store://bucket/shards/000000.tar"])
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
