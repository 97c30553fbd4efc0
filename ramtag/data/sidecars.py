"""Tags written beside the images: caption ``.txt`` files (the WD14/kohya convention) and XMP keyword sidecars.

Dataset builders for diffusion models and LoRAs train on ``image.txt`` holding comma-separated tags; photo
libraries (digiKam, Lightroom, exiftool) read keywords from an ``image.xmp`` sidecar's ``dc:subject`` bag. The
image files themselves are never rewritten.

Where a sidecar goes: beside an image file (same name, the sidecar's suffix), or, for images that are not files
of their own (shard members, rows of a Parquet file) or when a folder is given, under that folder by key (an
image file's key loses its image extension there too: ``sub/a.jpg`` -> ``DIR/sub/a.txt``). Keys can come from
archives, so they are never trusted as paths: every component is made harmless first.

Two images can name one sidecar: ``a.jpg`` and ``a.png`` of a folder both map to ``a.txt`` (beside them or under
a folder). Within a run the first of them in the listing keeps it and the other gets none
(:func:`shared_sidecars`): writing the second over the first would leave one image with the other's caption.
Which one keeps it is decided from the frozen listing, not from which is tagged first, so every rank, worker and
resumed attempt agrees, and an image rewriting its own sidecar on ``--resume`` is never taken for a clash.

An existing sidecar is kept (``skip``) unless asked otherwise: ``overwrite`` replaces a caption file, or the
keywords of an XMP file (its other metadata, edits a photo library made, stays); ``append`` adds the tags a
sidecar does not have yet, in order, so appending the same tags twice (a resumed run redoing the rows it was
writing when it stopped) changes nothing the second time.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa

from ramtag.atomic import write_text
from ramtag.data.listing import IMAGE_EXTENSIONS, MANIFEST_EXTENSIONS, filesystem_path
from ramtag.data.listing_file import RepeatedKeys, listing_batches
from ramtag.data.shards import is_shard_input
from ramtag.errors import OutputError, UsageError

SIDECAR_KINDS = ("txt", "xmp")
SIDECAR_MODES = ("skip", "overwrite", "append")

_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
}
for _prefix, _uri in _NS.items():
    ET.register_namespace(_prefix, _uri)
_RDF = "{%s}" % _NS["rdf"]
_DC = "{%s}" % _NS["dc"]
_UNSAFE = re.compile(r"[^\w.\- ]+")


class SidecarError(OutputError):
    """One sidecar could not be written (an unreadable existing XMP file, a read-only folder): the run goes on."""


@dataclass(frozen=True)
class CaptionStyle:
    """How tags become a caption line: ``prefix`` + tags joined by ``separator``, without the excluded ones."""

    exclude: frozenset[str] = frozenset()
    replace_underscores: bool = False
    """``long_hair`` -> ``long hair`` (booru-style vocabularies)."""
    prefix: str = ""
    """Written before the tags, as given (e.g. a LoRA trigger word: ``"trigger, "``)."""
    separator: str = ", "

    def tags(self, tags: Sequence[str]) -> list[str]:
        """The tags written, in order: an excluded tag is left out in either spelling (``long_hair``, ``long hair``)."""
        kept = [tag for tag in tags if tag not in self.exclude and tag.replace("_", " ") not in self.exclude]
        return [tag.replace("_", " ") for tag in kept] if self.replace_underscores else kept

    def caption(self, tags: Sequence[str]) -> str:
        return self.prefix + self.separator.join(self.tags(tags))


def safe_relative_path(key: str) -> PurePosixPath:
    """A relative path for a key that cannot leave its folder: no root, no ``..``, no odd characters."""
    parts = []
    for part in re.split(r"[\\/]+", key):
        part = _UNSAFE.sub("_", part).strip(" .")
        if part:
            parts.append(part[:120])
    return PurePosixPath(*parts) if parts else PurePosixPath("image")


def sidecar_path(kind: str, key: str, image_path: str | None, folder: str | Path | None) -> Path:
    """Where the sidecar of one image goes: beside its file, or under ``folder`` by key."""
    if kind not in SIDECAR_KINDS:
        raise ValueError(f"unknown sidecar kind {kind!r} ({', '.join(SIDECAR_KINDS)})")
    if folder is not None:
        relative = safe_relative_path(key)
        if relative.suffix.lower() in IMAGE_EXTENSIONS:
            relative = relative.with_suffix("")
        return Path(folder) / relative.parent / f"{relative.name}.{kind}"
    if image_path is None:
        raise SidecarError(f"{key}: not an image file of its own; sidecars for it need --sidecar-dir DIR")
    return Path(image_path).with_suffix(f".{kind}")


def own_image_file(source: str) -> str | None:
    """The image file a row was read from, when it is a file of its own: not a shard member, not an image
    embedded in a manifest or table, not a URL (their source names a container, whose sidecar this must never
    be). Reads nothing: whether the file is there is the writer's business."""
    path = filesystem_path(source)
    if "://" in path or is_shard_input(path) or path.lower().endswith(MANIFEST_EXTENSIONS):
        return None
    return path


def _suffix(name: str) -> str:
    """``PurePath(name).suffix``, without building a path (this runs once per listed image)."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def sidecar_stem(key: str, image_path: str | None, folder: str | Path | None) -> str | None:
    """``os.path.abspath`` of :func:`sidecar_path` without its suffix, which every kind shares: two images with
    one stem share their sidecars. None for an image that gets no sidecar. Strings only, no Path (a tenth of
    the time per listed image); tests hold it to sidecar_path."""
    if folder is not None:
        parts = [
            part[:120] for part in (_UNSAFE.sub("_", part).strip(" .") for part in re.split(r"[\\/]+", key)) if part
        ]
        parts = parts or ["image"]
        suffix = _suffix(parts[-1])
        if suffix.lower() in IMAGE_EXTENSIONS:
            parts[-1] = parts[-1][: -len(suffix)]
        return os.path.abspath(os.path.join(os.fspath(folder), *parts))
    if image_path is None:
        return None
    head, name = os.path.split(image_path)
    suffix = _suffix(name)
    return os.path.abspath(os.path.join(head, name[: -len(suffix)] if suffix else name))


def _stems(batch: pa.RecordBatch, folder: str | Path | None) -> list[str | None]:
    """The sidecar stem of each listed row; None for rows listed with an error (they get no sidecar)."""
    keys, sources = batch.column("key").to_pylist(), batch.column("source").to_pylist()
    errors = batch.column("error").to_pylist()
    if folder is not None:
        return [None if error is not None else sidecar_stem(key, None, folder) for key, error in zip(keys, errors)]
    return [
        None if error is not None else sidecar_stem(key, own_image_file(source), None)
        for key, source, error in zip(keys, sources, errors)
    ]


def shared_sidecars(listing: Path, folder: str | Path | None) -> dict[str, tuple[str, str]]:
    """The rows of a listing whose sidecars a row before them already names: ``key -> (the earlier row's
    source, the shared stem)``.

    In bounded memory, as the listing's own repeat check (:mod:`ramtag.data.listing_file`): a first pass sends
    8 bytes a row (a hash of its stem) to bucket files beside the listing; only when a hash repeats does a second
    pass look at the rows that hold one. What stays is an entry per image that loses its sidecar."""
    with RepeatedKeys(listing.parent) as hashes:
        for batch in listing_batches(listing):
            hashes.add(pa.array([stem for stem in _stems(batch, folder) if stem is not None], pa.string()))
        suspects = hashes.suspects()
    if not suspects:  # the usual run: no two images share a stem
        return {}
    owners: dict[str, str] = {}
    shared: dict[str, tuple[str, str]] = {}
    for batch in listing_batches(listing):
        keys, sources = batch.column("key"), batch.column("source")
        for row, stem in enumerate(_stems(batch, folder)):
            if stem is None or hash(stem) not in suspects:
                continue
            if stem in owners:
                shared[keys[row].as_py()] = (owners[stem], stem)
            else:
                owners[stem] = sources[row].as_py()
    return shared


def read_exclude_tags(path: str | Path) -> frozenset[str]:
    """Tags never written to a sidecar: one per line or comma-separated (a WD14 exclude list), ``#`` comments.

    Each is kept as written and with underscores as spaces, so either spelling excludes both."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise UsageError(f"--exclude-tags {path}: no such file") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"--exclude-tags {path}: a folder, not a file of tags") from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or str(exc))
        raise UsageError(f"--exclude-tags {path}: cannot read ({reason})") from exc
    tags: set[str] = set()
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        for tag in line.split(","):
            if tag.strip():
                tags.update({tag.strip(), tag.strip().replace("_", " ")})
    return frozenset(tags)


def _caption_tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def _empty_xmp() -> ET.ElementTree:
    meta = ET.Element(f"{{{_NS['x']}}}xmpmeta")
    rdf = ET.SubElement(meta, f"{_RDF}RDF")
    ET.SubElement(rdf, f"{_RDF}Description", {f"{_RDF}about": ""})
    return ET.ElementTree(meta)


def _keyword_bag(tree: ET.ElementTree) -> ET.Element:
    """The ``dc:subject`` ``rdf:Bag`` of the first rdf:Description, created where missing."""
    root = tree.getroot()
    rdf = root if root.tag == f"{_RDF}RDF" else root.find(f"{_RDF}RDF")
    if rdf is None:
        rdf = ET.SubElement(root, f"{_RDF}RDF")
    description = rdf.find(f"{_RDF}Description")
    if description is None:
        description = ET.SubElement(rdf, f"{_RDF}Description", {f"{_RDF}about": ""})
    subject = description.find(f"{_DC}subject")
    if subject is None:
        subject = ET.SubElement(description, f"{_DC}subject")
    bag = subject.find(f"{_RDF}Bag")
    if bag is None:
        bag = ET.SubElement(subject, f"{_RDF}Bag")
    return bag


def xmp_keywords(text: str) -> list[str]:
    """The ``dc:subject`` keywords of an XMP packet (what digiKam and Lightroom show as keywords)."""
    bag = _keyword_bag(ET.ElementTree(ET.fromstring(_strip_packet(text))))
    return [item.text or "" for item in bag.findall(f"{_RDF}li")]


def _strip_packet(text: str) -> str:
    return re.sub(r"<\?xpacket[^>]*\?>", "", text).strip()


def xmp_document(keywords: Sequence[str], existing: str | None = None, keep: bool = False) -> str:
    """An XMP sidecar with ``keywords`` as its ``dc:subject``; other metadata of ``existing`` is kept, and with
    ``keep`` its keywords too (new ones appended)."""
    tree = ET.ElementTree(ET.fromstring(_strip_packet(existing))) if existing else _empty_xmp()
    bag = _keyword_bag(tree)
    old = [item.text or "" for item in bag.findall(f"{_RDF}li")]
    if not keep:
        for item in list(bag):
            bag.remove(item)
        old = []
    for keyword in keywords:
        if keyword not in old:
            ET.SubElement(bag, f"{_RDF}li").text = keyword
            old.append(keyword)
    ET.indent(tree, space=" ")
    body = ET.tostring(tree.getroot(), encoding="unicode")
    return f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n{body}\n<?xpacket end="w"?>\n'


@dataclass
class SidecarWriter:
    """Writes one sidecar per tagged image and counts what it did (written, kept, appended, failed)."""

    kind: str
    mode: str = "skip"
    style: CaptionStyle = field(default_factory=CaptionStyle)
    folder: str | Path | None = None
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.kind not in SIDECAR_KINDS:
            raise ValueError(f"unknown sidecar kind {self.kind!r} ({', '.join(SIDECAR_KINDS)})")
        if self.mode not in SIDECAR_MODES:
            raise ValueError(f"unknown sidecar mode {self.mode!r} ({', '.join(SIDECAR_MODES)})")

    def write(self, key: str, image_path: str | None, tags: Sequence[str]) -> str:
        """Write (or keep) the sidecar of one image; returns what happened: written, kept or appended."""
        path = sidecar_path(self.kind, key, image_path, self.folder)
        exists = path.exists()
        if exists and self.mode == "skip":
            outcome = "kept"
        else:
            append = exists and self.mode == "append"
            try:
                existing = path.read_text(encoding="utf-8") if exists else None
                write_text(path, self._render(tags, existing, append))
            except (OSError, UnicodeDecodeError, ET.ParseError) as exc:
                self.counts["failed"] += 1
                reason = "not a readable XMP file" if isinstance(exc, ET.ParseError) else (exc.strerror or str(exc))
                raise SidecarError(f"{path}: {reason}") from exc
            outcome = "appended" if append else "written"
        self.counts[outcome] += 1
        return outcome

    def _render(self, tags: Sequence[str], existing: str | None, append: bool) -> str:
        new = self.style.tags(tags)
        if self.kind == "xmp":
            return xmp_document(new, existing, keep=append)
        if append and existing is not None:
            old = _caption_tags(existing)
            return self.style.separator.join(old + [tag for tag in new if tag not in old]) + "\n"
        return self.style.caption(tags) + "\n"
