"""Caption .txt and XMP sidecars: where they go, what they hold, and that existing files are respected."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from ramtag.data.sidecars import (
    CaptionStyle,
    SidecarError,
    SidecarWriter,
    safe_relative_path,
    sidecar_path,
    xmp_document,
    xmp_keywords,
)

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
