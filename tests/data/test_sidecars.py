"""Caption .txt and XMP sidecars: where they go, what they hold, and that existing files are respected."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from ramtag.data.assemble import label_file_path, write_label_file
from ramtag.data.sidecars import (
    CaptionStyle,
    SidecarError,
    SidecarWriter,
    read_exclude_tags,
    safe_relative_path,
    sidecar_path,
    xmp_document,
    xmp_keywords,
)
from ramtag.data.vocab import read_labels
from ramtag.engine.sidecars import SidecarOptions, SidecarStage, check_sidecar_options, parse_sidecar_kinds
from ramtag.errors import UsageError

# An XMP sidecar as a photo library leaves it: a rating and a label besides the keywords.
LIGHTROOM_XMP = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmp:Rating="4" xmp:Label="Red">
   <dc:subject><rdf:Bag><rdf:li>holiday</rdf:li><rdf:li>cat</rdf:li></rdf:Bag></dc:subject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def test_a_caption_is_the_prefix_then_the_kept_tags():
    style = CaptionStyle(exclude=frozenset({"blurry"}), replace_underscores=True, prefix="trigger, ")
    assert style.caption(["long_hair", "blurry", "red car"]) == "trigger, long hair, red car"
    assert CaptionStyle().caption(["a_b", "c"]) == "a_b, c"


def test_sidecars_go_beside_files_or_under_a_folder_by_key(tmp_path):
    assert sidecar_path("txt", "sub/img.jpg", str(tmp_path / "sub/img.jpg"), None) == tmp_path / "sub/img.txt"
    assert sidecar_path("xmp", "img.png", str(tmp_path / "img.png"), None) == tmp_path / "img.xmp"
    assert sidecar_path("txt", "00000/000000012", None, tmp_path / "caps") == tmp_path / "caps/00000/000000012.txt"
    with pytest.raises(SidecarError, match="--sidecar-dir"):
        sidecar_path("txt", "shard.tar/key", None, None)


@pytest.mark.parametrize(
    "key", ["../../etc/passwd", "/abs/path", "a/../../b", "..", "C:\\win\\x", "a/./b", "", "ok/name\x00x"]
)
def test_keys_from_archives_never_leave_the_sidecar_folder(key, tmp_path):
    relative = safe_relative_path(key)
    assert not relative.is_absolute() and ".." not in relative.parts and "." not in relative.parts
    target = sidecar_path("txt", key, None, tmp_path).resolve()
    assert target.is_relative_to(tmp_path.resolve())


def test_existing_captions_are_kept_unless_asked(tmp_path):
    image = tmp_path / "img.jpg"
    image.write_bytes(b"not rewritten")
    caption = tmp_path / "img.txt"
    caption.write_text("hand written, cat\n")

    skip = SidecarWriter("txt")
    assert skip.write("img.jpg", str(image), ["cat", "dog"]) == "kept"
    assert caption.read_text() == "hand written, cat\n"

    assert SidecarWriter("txt", mode="append").write("img.jpg", str(image), ["cat", "dog"]) == "appended"
    assert caption.read_text() == "hand written, cat, dog\n"

    overwrite = SidecarWriter("txt", mode="overwrite", style=CaptionStyle(prefix="sks, "))
    assert overwrite.write("img.jpg", str(image), ["cat", "dog"]) == "written"
    assert caption.read_text() == "sks, cat, dog\n"
    assert image.read_bytes() == b"not rewritten"
    assert overwrite.counts == {"written": 1}


def test_a_new_xmp_sidecar_holds_the_tags_as_dc_subject_keywords(tmp_path):
    writer = SidecarWriter("xmp")
    writer.write("img.jpg", str(tmp_path / "img.jpg"), ["cat", "red car", "a & b <c>"])
    text = (tmp_path / "img.xmp").read_text(encoding="utf-8")
    assert xmp_keywords(text) == ["cat", "red car", "a & b <c>"]
    root = ET.fromstring(text.split("?>", 1)[1].rsplit("<?xpacket", 1)[0])  # well-formed XML inside the packet
    assert root.tag == "{adobe:ns:meta/}xmpmeta"


def test_rewriting_keywords_keeps_what_a_photo_library_stored(tmp_path):
    replaced = xmp_document(["dog"], LIGHTROOM_XMP)
    assert xmp_keywords(replaced) == ["dog"]
    merged = xmp_document(["cat", "dog"], LIGHTROOM_XMP, keep=True)
    assert xmp_keywords(merged) == ["holiday", "cat", "dog"]
    for text in (replaced, merged):
        description = ET.fromstring(text.split("?>", 1)[1].rsplit("<?xpacket", 1)[0]).find(".//{*}Description")
        assert description.get("{http://ns.adobe.com/xap/1.0/}Rating") == "4"
        assert description.get("{http://ns.adobe.com/xap/1.0/}Label") == "Red"


def test_an_unreadable_existing_xmp_is_one_failure_not_a_crash(tmp_path):
    (tmp_path / "img.xmp").write_text("<x:xmpmeta this is not xml")
    writer = SidecarWriter("xmp", mode="append")
    with pytest.raises(SidecarError, match="img.xmp: not a readable XMP file"):
        writer.write("img.jpg", str(tmp_path / "img.jpg"), ["cat"])
    assert (tmp_path / "img.xmp").read_text() == "<x:xmpmeta this is not xml"
    assert writer.counts == {"failed": 1}


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is not installed")
def test_exiftool_reads_the_keywords(tmp_path):
    SidecarWriter("xmp").write("img.jpg", str(tmp_path / "img.jpg"), ["cat", "red car"])
    out = subprocess.run(["exiftool", "-s3", "-Subject", str(tmp_path / "img.xmp")], capture_output=True, text=True)
    assert out.stdout.strip() == "cat, red car"


def test_an_image_file_keeps_its_folder_but_not_its_extension_under_a_sidecar_folder(tmp_path):
    assert sidecar_path("txt", "sub/img.JPG", "/elsewhere/sub/img.JPG", tmp_path) == tmp_path / "sub/img.txt"
    assert sidecar_path("xmp", "000.tar/key.5", None, tmp_path) == tmp_path / "000.tar/key.5.xmp"


def test_exclude_lists_take_lines_or_commas_and_either_spelling(tmp_path):
    listing = tmp_path / "exclude.txt"
    listing.write_text("# WD14 style\nlong_hair, blurry\n\nred car\n")
    exclude = read_exclude_tags(listing)
    style = CaptionStyle(exclude=exclude, replace_underscores=True)
    assert style.tags(["long hair", "long_hair", "blurry", "red_car", "cat"]) == ["cat"]
    assert CaptionStyle(exclude=frozenset({"long hair"})).tags(["long_hair", "cat"]) == ["cat"]
    with pytest.raises(UsageError, match="--exclude-tags .*missing.txt: no such file"):
        read_exclude_tags(tmp_path / "missing.txt")
    with pytest.raises(UsageError, match="a folder"):
        read_exclude_tags(tmp_path)


@pytest.mark.parametrize("kind", ["txt", "xmp"])
def test_appending_the_same_tags_twice_adds_them_once(kind, tmp_path):
    image = tmp_path / "img.jpg"
    writer = SidecarWriter(kind, mode="append", style=CaptionStyle(prefix="sks, "))
    assert writer.write("img.jpg", str(image), ["cat"]) == "written"
    for _ in range(2):  # the second time: a resumed run redoing the rows it had not committed
        assert writer.write("img.jpg", str(image), ["cat", "dog"]) == "appended"
    text = (tmp_path / f"img.{kind}").read_text(encoding="utf-8")
    if kind == "xmp":  # the prefix is a caption's, not a keyword
        assert xmp_keywords(text) == ["cat", "dog"]
    else:
        assert text == "sks, cat, dog\n"


def test_kinds_come_repeated_or_comma_separated_once_each():
    assert parse_sidecar_kinds(["txt,xmp", "TXT", " xmp "]) == ("txt", "xmp")
    assert parse_sidecar_kinds(None) == ()
    with pytest.raises(UsageError, match="unknown kind"):
        parse_sidecar_kinds(["json"])


def test_images_that_are_not_files_need_a_sidecar_folder():
    with pytest.raises(UsageError, match="give --sidecar-dir"):
        check_sidecar_options(SidecarOptions(kinds=("txt",)), ["data/{0..9}.tar"])
    with pytest.raises(UsageError, match="--image-column jpg"):
        check_sidecar_options(SidecarOptions(kinds=("txt",)), ["images.parquet"], image_column="jpg")
    check_sidecar_options(SidecarOptions(kinds=("txt",), folder="caps"), ["data/{0..9}.tar"])
    check_sidecar_options(SidecarOptions(), ["data/{0..9}.tar"])


def test_the_stage_counts_failures_and_never_writes_beside_a_container(tmp_path):
    manifest = tmp_path / "images.parquet"
    manifest.write_bytes(b"PAR1")
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    warnings = []
    stage = SidecarStage(SidecarOptions(kinds=("txt",)), warn=warnings.append)
    stage.write(["a.png", "images.parquet:3"], [str(image), str(manifest)], [["cat"], ["dog"]])
    assert (tmp_path / "a.txt").read_text() == "cat\n"
    assert not (tmp_path / "images.txt").exists()  # a manifest's rows are not the manifest
    assert stage.counts() == {"written": 1, "failed": 1}
    assert len(warnings) == 1 and warnings[0].startswith("ramtag: warning: sidecar images.parquet:3: not an image")


def test_many_failures_warn_a_few_lines_and_count_them_all(tmp_path):
    from ramtag.engine.sidecars import WARNED_FAILURES

    warnings = []
    stage = SidecarStage(SidecarOptions(kinds=("txt",)), warn=warnings.append)
    keys = [f"shard.tar/{index}" for index in range(WARNED_FAILURES + 5)]
    stage.write(keys, ["shard.tar"] * len(keys), [["cat"]] * len(keys))
    assert stage.counts()["failed"] == len(keys)
    assert len(warnings) == WARNED_FAILURES + 1 and "only counted" in warnings[-1]


def test_the_vocabulary_file_reads_back_as_labels(tmp_path):
    labels = ["cat", "C#", "red car", "naïve"]
    path = label_file_path(tmp_path / "out")
    assert path == tmp_path / "out.labels.txt"
    write_label_file(path, labels)
    assert read_labels(path).labels == labels


def _listing(path, rows, batch_rows=2):
    """A listing file as the run spills it (Arrow IPC, a batch per unit), of (key, source, error) rows."""
    import pyarrow as pa

    from ramtag.data.listing_file import ListingWriter

    names = ["key", "source", "error"]
    table = pa.table({name: pa.array([row[index] for row in rows], pa.string()) for index, name in enumerate(names)})
    writer = ListingWriter(path, table.schema, batch_rows)
    for batch in table.to_batches(max_chunksize=batch_rows):
        writer.write(batch)
    writer.close()
    return path


def test_images_sharing_a_stem_are_found_across_a_listing_in_any_order(tmp_path):
    from ramtag.data.sidecars import shared_sidecars

    photos = tmp_path / "photos"
    rows = [  # a manifest's order: the two a's far apart, spelled differently, other stems left alone
        ("photos/a.png", str(photos / "a.png"), None),
        ("photos/b.png", str(photos / "b.png"), None),
        ("photos/a.b.png", str(photos / "a.b.png"), None),
        ("other/a.png", str(tmp_path / "other" / "a.png"), None),
        ("photos/c.png", str(photos / "c.png"), "cannot read: no such file"),
        ("x", str(photos / "." / "a.JPG"), None),
        ("photos/c.jpg", str(photos / "c.jpg"), None),  # c.png is an error row: no sidecar, no clash
    ]
    stem = str(photos / "a")
    listing = tmp_path / "listing.arrow"
    assert shared_sidecars(_listing(listing, rows), None) == {"x": (str(photos / "a.png"), stem)}
    # under a sidecar folder the key decides: photos/a.png and photos/a.b.png do not clash, other/a.png neither
    by_key = shared_sidecars(_listing(listing, rows + [("photos/a.jpg", "s3://b/a.jpg", None)]), tmp_path / "caps")
    assert by_key == {"photos/a.jpg": (str(photos / "a.png"), str(tmp_path / "caps" / "photos" / "a"))}
    assert shared_sidecars(_listing(listing, rows[:4]), None) == {}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["listing.arrow"]  # the hash buckets are gone


@pytest.mark.parametrize(
    "key",
    [
        "a.jpg",
        "sub/a.PNG",
        "../../x.tiff",
        "a..jpg",
        ".hidden.jpg",
        "x/.jpg",
        "a:b?.webp",
        "n" * 130 + ".jpg",
        "dir.v1/0001",
        "a.",
        "//root//b.gif",
        " sp ace /x. .png",
        "naïve/é.jpg",
        "a.txt",
    ],
)
def test_the_stem_that_finds_clashes_is_the_sidecar_path_without_its_suffix(key, tmp_path):
    """sidecar_stem is a fast copy of sidecar_path: where they differed, a clash would be missed or invented."""
    import os

    from ramtag.data.sidecars import sidecar_stem

    for folder, image in ((tmp_path / "caps", None), (None, key), (None, str(tmp_path / key)), (None, "./" + key)):
        expected = os.path.abspath(sidecar_path("txt", key, image, folder).with_suffix(""))
        assert sidecar_stem(key, image, folder) == expected
