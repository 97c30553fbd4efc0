"""What `ramtag tag` writes besides the table: caption/XMP sidecars, the vocabulary file, and a dataset folder
that every installed reader opens by name. Runs the bundled demo model through the CLI (loaded once)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pyarrow.parquet as pq
import pytest

from ramtag.cli.options import ModelChoice
from ramtag.data.sidecars import xmp_keywords
from tests.io_fixtures import image_shard, run_cli, write_image

LABELS = ["red", "blue_sky", "green", "long_hair", "tree"]
DC_SUBJECT = ".//{http://purl.org/dc/elements/1.1/}subject/{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Bag"


@pytest.fixture(scope="module")
def demo_runtime():
    from ramtag.engine.runtime import load_runtime

    return load_runtime(model="demo", device="cpu")


@pytest.fixture()
def demo(demo_runtime, monkeypatch):
    """`--model demo` without loading it again for every run."""
    monkeypatch.setattr(ModelChoice, "load", lambda self: demo_runtime)


@pytest.fixture()
def no_model(monkeypatch):
    """A run that must be refused before any model loads."""

    def load(self):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(ModelChoice, "load", load)


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    for index, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        write_image(root / name, seed=index)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(LABELS) + "\n")
    return root, vocab



def _tag(root, vocab, out, *extra) -> int:
    return run_cli("tag", root, "--labels", vocab, "--model", "demo", "-o", out, "--workers", 0, "-q", *extra)


def _table_tags(out) -> dict[str, list[str]]:
    return {row["key"]: [tag["label"] for tag in row["tags"]] for row in pq.read_table(out).to_pylist()}


def _image_files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.suffix in (".png", ".jpg")}


def test_caption_and_xmp_sidecars_hold_the_table_tags_as_styled(photos, demo, tmp_path):
    root, vocab = photos
    images = _image_files(root)
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("# never in a caption\ngreen, long hair\n")
    out = tmp_path / "tags.parquet"
    code = _tag(
        root, vocab, out, "-k", 0, "--sidecars", "txt", "--sidecars", "xmp", "--exclude-tags", exclude,
        "--replace-underscores", "--prefix", "sks, ",
    )
    assert code == 0
    tags = _table_tags(out)
    assert sorted(tags) == ["a.png", "b.jpg", "sub/c.png"] and all(len(t) == len(LABELS) for t in tags.values())
    for key, labels in tags.items():
        written = [label.replace("_", " ") for label in labels if label not in ("green", "long_hair")]
        stem = (root / key).with_suffix("")
        assert stem.with_suffix(".txt").read_text() == "sks, " + ", ".join(written) + "\n"
        xmp = stem.with_suffix(".xmp").read_text(encoding="utf-8")
        body = xmp.split("?>", 1)[1].rsplit("<?xpacket", 1)[0]  # the XML inside the XMP packet
        bag = ET.fromstring(body).find(DC_SUBJECT)
        assert [item.text for item in bag] == written == xmp_keywords(xmp)
    assert _image_files(root) == images  # the images themselves are never rewritten


def test_existing_sidecars_are_kept_replaced_or_appended_to_once(photos, demo, tmp_path):
    root, vocab = photos
    caption = root / "a.txt"
    caption.write_text("hand written\n")
    assert _tag(root, vocab, tmp_path / "1.parquet", "-k", 2, "--sidecars", "txt") == 0
    assert caption.read_text() == "hand written\n"  # skip is the default
    new = _table_tags(tmp_path / "1.parquet")
    assert (root / "b.txt").read_text() == ", ".join(new["b.jpg"]) + "\n"

    for run in range(2):  # a second append (a resumed run redoing rows) adds nothing
        assert _tag(root, vocab, tmp_path / f"append{run}.jsonl", "-k", 2, "--sidecars", "txt",
                    "--sidecar-mode", "append") == 0
        assert caption.read_text() == ", ".join(["hand written", *new["a.png"]]) + "\n"

    assert _tag(root, vocab, tmp_path / "3.parquet", "-k", 1, "--sidecars", "txt", "--sidecar-mode", "overwrite") == 0
    assert caption.read_text() == _table_tags(tmp_path / "3.parquet")["a.png"][0] + "\n"


def test_a_resumed_run_appends_each_tag_once(photos, demo, tmp_path, monkeypatch):
    from ramtag.engine.runtime import Runtime

    root, vocab = photos
    for image in ("a", "b", "sub/c"):
        (root / f"{image}.txt").write_text("hand written\n")
    real_score, calls = Runtime.score, {"n": 0}

    def score_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # two rows tagged and their sidecars appended to; the unit is not committed
            raise KeyboardInterrupt
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(Runtime, "score", score_then_interrupt)
    out = tmp_path / "tags.parquet"
    args = ["-k", 2, "--batch-size", 1, "--sidecars", "txt", "--sidecar-mode", "append"]
    assert _tag(root, vocab, out, *args) == 130
    assert sum((root / f"{image}.txt").read_text() != "hand written\n" for image in ("a", "b", "sub/c")) == 2
    monkeypatch.setattr(Runtime, "score", real_score)
    assert _tag(root, vocab, out, *args, "--resume") == 0  # redoes the uncommitted unit's rows
    for key, labels in _table_tags(out).items():
        caption = (root / key).with_suffix(".txt").read_text()
        assert caption == ", ".join(["hand written", *labels]) + "\n"


def test_shard_sidecars_go_under_the_sidecar_folder_by_a_harmless_key(photos, demo, tmp_path):
    _, vocab = photos
    shard = image_shard(tmp_path / "shards" / "000000.tar", ["s0", "s1", "../../escape"])
    captions = tmp_path / "captions"
    out = tmp_path / "out.parquet"
    assert _tag(shard, vocab, out, "-k", 2, "--sidecars", "txt,xmp", "--sidecar-dir", captions) == 0
    tags = _table_tags(out)
    assert set(tags) >= {"000000.tar/s0", "000000.tar/s1"}
    for key in ("s0", "s1"):
        assert (captions / "000000.tar" / f"{key}.txt").read_text() == ", ".join(tags[f"000000.tar/{key}"]) + "\n"
        assert xmp_keywords((captions / "000000.tar" / f"{key}.xmp").read_text(encoding="utf-8")) == tags[
            f"000000.tar/{key}"
        ]
    sidecars = {path.resolve() for path in tmp_path.rglob("*") if path.suffix in (".txt", ".xmp")}
    sidecars -= {vocab.resolve(), (tmp_path / "out.parquet.labels.txt").resolve()}
    assert len(sidecars) == 6 and all(path.is_relative_to(captions.resolve()) for path in sidecars)


def test_files_go_to_a_parallel_folder_by_key(photos, demo, tmp_path):
    root, vocab = photos
    captions = tmp_path / "captions"
    assert _tag(root, vocab, tmp_path / "t.parquet", "--sidecars", "txt", "--sidecar-dir", captions) == 0
    assert sorted(str(p.relative_to(captions)) for p in captions.rglob("*.txt")) == ["a.txt", "b.txt", "sub/c.txt"]
    assert not list(root.rglob("*.txt"))


def test_a_sidecar_that_cannot_be_written_is_a_warning_and_the_partial_status(photos, demo, tmp_path, capsys):
    root, vocab = photos
    (root / "a.xmp").write_text("<x:xmpmeta this is not xml")
    out = tmp_path / "tags.parquet"
    code = run_cli("tag", root, "--labels", vocab, "--model", "demo", "-o", out, "--workers", 0,
                   "--sidecars", "xmp", "--sidecar-mode", "append")
    err = capsys.readouterr().err
    assert code == 3
    assert f"ramtag: warning: sidecar {root / 'a.xmp'}: not a readable XMP file" in err
    assert "sidecars: 2 written, 1 could not be written" in err
    assert "1 sidecar(s) could not be written" in err.splitlines()[-1]
    assert len(_table_tags(out)) == 3 and (root / "b.xmp").exists()  # the table and the other sidecars are whole
    assert (root / "a.xmp").read_text() == "<x:xmpmeta this is not xml"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sidecars", "txt", "--exclude-tags", "missing.txt"], "--exclude-tags missing.txt: no such file"),
        (["--sidecars", "txt", "--sidecar-mode", "merge"], "--sidecar-mode merge: choose skip, overwrite, append"),
        (["--sidecars", "png"], "--sidecars png: unknown kind"),
        (["--prefix", "sks, "], "--prefix shapes sidecars; add --sidecars"),
        (["--labels-out", "."], "--labels-out . is a folder"),
        (["--sidecars", "txt", "--sidecar-dir", "out/caps", "-o", "out/"], "is inside the output folder out/"),
    ],
)
def test_sidecar_mistakes_are_refused_before_the_model_loads(photos, no_model, tmp_path, capsys, extra, message,
                                                             monkeypatch):
    root, vocab = photos
    monkeypatch.chdir(tmp_path)
    assert run_cli("tag", root, "--labels", vocab, "--model", "demo", "-o", "t.parquet", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.parquet").exists()


def test_shards_without_a_sidecar_folder_are_refused_before_the_model_loads(photos, no_model, tmp_path, capsys):
    _, vocab = photos
    shard = image_shard(tmp_path / "000000.tar", ["s0"])
    assert run_cli("tag", shard, "--labels", vocab, "--model", "demo", "-o", tmp_path / "t.parquet",
                   "--sidecars", "txt") == 2
    assert "give --sidecar-dir DIR" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tags.parquet", "tags.jsonl", "out/"])
def test_the_vocabulary_file_beside_the_output_is_the_scores_order(photos, demo, tmp_path, name):
    root, vocab = photos
    out = tmp_path / name
    assert _tag(root, vocab, f"{out}/" if name.endswith("/") else out, "--all-scores", "-k", 2) == 0
    label_file = tmp_path / (name.rstrip("/") + ".labels.txt")
    labels = label_file.read_text().splitlines()
    assert labels == LABELS
    if name.endswith(".jsonl"):
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        metadata = json.loads((tmp_path / "tags.jsonl.meta.json").read_text())
    else:
        rows = pq.read_table(out).to_pylist()
        metadata = json.loads(pq.read_schema(next(out.glob("*.parquet")) if out.is_dir() else out).metadata[b"ramtag"])
    assert metadata["vocabulary"] == labels
    for row in rows:
        assert len(row["scores"]) == len(labels)
        for tag in row["tags"]:
            assert row["scores"][labels.index(tag["label"])] == pytest.approx(tag["score"])


def test_stdout_rows_get_their_vocabulary_from_labels_out(photos, demo, tmp_path, capsys):
    root, vocab = photos
    label_file = tmp_path / "labels.txt"
    assert _tag(root, vocab, "-", "--all-scores", "--labels-out", label_file) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # every line is a row: jq .tags works
    assert len(rows) == 3 and all("tags" in row for row in rows)
    labels = label_file.read_text().splitlines()
    assert labels == LABELS
    for row in rows:
        best = max(range(len(labels)), key=lambda i: row["scores"][i])
        assert row["tags"][0]["label"] == labels[best]


def test_a_dataset_folder_opens_by_name_in_every_installed_reader(photos, demo, tmp_path):
    root, vocab = photos
    out = tmp_path / "out"
    assert _tag(root, vocab, f"{out}/", "--all-scores") == 0
    assert (tmp_path / "out.labels.txt").exists()  # beside the folder: polars refuses mixed extensions inside
    folder = f"{out}/"
    counts = {}
    polars = pytest.importorskip("polars")
    counts["polars scan"] = polars.scan_parquet(folder).collect().height
    counts["polars read"] = polars.read_parquet(folder).height
    pandas = pytest.importorskip("pandas")
    counts["pandas"] = len(pandas.read_parquet(folder))
    import pyarrow.dataset

    counts["pyarrow.dataset"] = pyarrow.dataset.dataset(folder, format="parquet").to_table().num_rows
    duckdb = pytest.importorskip("duckdb")
    counts["duckdb glob"] = duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0]
    counts["duckdb folder"] = duckdb.sql(f"select count(*) from read_parquet('{folder}')").fetchall()[0][0]
    assert counts == dict.fromkeys(counts, 3)


@pytest.fixture()
def same_stem(tmp_path):
    """a.jpg and a.png in one folder, red and blue so that their tags differ, and b.png."""
    from PIL import Image

    root = tmp_path / "lora"
    root.mkdir()
    Image.new("RGB", (32, 32), (220, 20, 20)).save(root / "a.jpg")
    Image.new("RGB", (32, 32), (20, 40, 230)).save(root / "a.png")
    write_image(root / "b.png", seed=3)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(LABELS) + "\n")
    return root, vocab


def _sharing_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ramtag: warning:") and "would share" in line]


@pytest.mark.parametrize(
    ("beside", "mode"),
    [(True, "skip"), (True, "overwrite"), (True, "append"), (False, "overwrite")],
    ids=["beside-skip", "beside-overwrite", "beside-append", "sidecar-dir-overwrite"],
)
def test_two_images_of_one_stem_never_write_over_each_others_sidecar(same_stem, demo, tmp_path, capsys, beside, mode):
    root, vocab = same_stem
    folder = root if beside else tmp_path / "captions"
    where = [] if beside else ["--sidecar-dir", folder]
    out = tmp_path / "tags.parquet"
    options = ["--workers", 0, "-k", 0, "--sidecars", "txt,xmp", "--sidecar-mode", mode, *where]
    code = run_cli("tag", root, "--labels", vocab, "--model", "demo", "-o", out, *options)
    err = capsys.readouterr().err
    tags = _table_tags(out)
    assert tags["a.jpg"] != tags["a.png"]  # else this test could not tell whose caption a.txt holds
    assert sorted(tags) == ["a.jpg", "a.png", "b.png"] and all(tags.values())  # the table holds both
    # the first listed keeps the sidecars; the second writes none over them
    assert (folder / "a.txt").read_text() == ", ".join(tags["a.jpg"]) + "\n"
    assert xmp_keywords((folder / "a.xmp").read_text(encoding="utf-8")) == tags["a.jpg"]
    assert (folder / "b.txt").read_text() == ", ".join(tags["b.png"]) + "\n"
    [warning] = _sharing_warnings(err)
    assert warning.startswith(f"ramtag: warning: sidecars {folder / 'a.txt'} and {folder / 'a.xmp'}: ")
    assert str(root / "a.png") in warning and str(root / "a.jpg") in warning
    assert code == 3 and "sidecars: 4 written, 2 could not be written" in err


def test_a_resumed_run_never_takes_an_images_own_sidecar_for_a_clash(same_stem, demo, tmp_path, monkeypatch, capsys):
    from ramtag.engine.runtime import Runtime

    root, vocab = same_stem
    (root / "a.txt").write_text("hand written\n")  # there before the run: append adds to it
    real_score, calls = Runtime.score, {"n": 0}

    def score_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # a.jpg tagged and its caption appended to; the unit is not committed
            raise KeyboardInterrupt
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(Runtime, "score", score_then_interrupt)
    out = tmp_path / "tags.parquet"
    args = ["-k", 2, "--batch-size", 1, "--sidecars", "txt", "--sidecar-mode", "append"]
    assert run_cli("tag", root, "--labels", vocab, "--model", "demo", "-o", out, "--workers", 0, *args) == 130
    assert (root / "a.txt").read_text() != "hand written\n"
    monkeypatch.setattr(Runtime, "score", real_score)
    capsys.readouterr()
    code = run_cli("tag", root, "--labels", vocab, "--model", "demo", "-o", out, "--workers", 0, *args, "--resume")
    err = capsys.readouterr().err
    tags = _table_tags(out)
    # a.jpg redoes its own sidecar (appending nothing twice); only a.png, which shares it, is warned about
    assert (root / "a.txt").read_text() == ", ".join(["hand written", *tags["a.jpg"]]) + "\n"
    [warning] = _sharing_warnings(err)
    assert f"{root / 'a.png'} and {root / 'a.jpg'} would share it" in warning
    assert code == 3
