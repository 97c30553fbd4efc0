"""Readers for labelled image lists: the reference's JSON split files, JSONL manifests, COCO instances.

Every reader returns a :class:`LabelledSet`: ``(path, labels)`` pairs, labels deduplicated per
image in first-seen order (the reference's files repeat a label once per object instance), plus
the class list when the file declares one. Paths go through :class:`PathResolver`: prefix
mappings first (for files written on another machine, such as the reference's ``/mnt/nas/...``),
then ``root`` for paths that are still relative. Without ``root`` relative paths are kept as written.

Problems raise :class:`ramtag.errors.DataError` naming the file and the line (JSONL) or the entry
(``images[12]``, for JSON documents, which are often a single line).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

from ramtag.errors import DataError
from ramtag.messages import listed

AnnotationFormat = Literal["reference", "jsonl", "coco"]
ErrorPolicy = Literal["raise", "skip"]
PathLike = Union[str, "os.PathLike[str]"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_MAX_LISTED = 5


class LabelledImage(NamedTuple):
    path: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelledSet:
    """Images with their label names; ``classes`` is the file's declared class list, if any."""

    images: list[LabelledImage]
    classes: tuple[str, ...] | None = None
    source: str = ""
    format: str = ""
    skipped: tuple[str, ...] = field(default=(), repr=False)
    """``file:line: reason`` for each input line skipped under ``on_error="skip"``."""

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class PrefixMapping:
    """Rewrite paths starting with ``old`` (at a path-component boundary) to start with ``new``."""

    old: str
    new: str

    def apply(self, path: str) -> str | None:
        old = self.old.rstrip("/") or "/"
        if path == old:
            rest = ""
        elif path.startswith(old if old.endswith("/") else old + "/"):
            rest = path[len(old) :].lstrip("/")
        else:
            return None
        if not self.new:
            return rest
        return self.new.rstrip("/") + "/" + rest if rest else self.new


def parse_prefix_mapping(text: str) -> PrefixMapping:
    """Parse ``OLD=NEW`` (NEW may be empty, leaving a relative path for ``root`` to resolve)."""
    old, separator, new = text.partition("=")
    if not separator or not old:
        raise DataError(f"path prefix mapping must look like OLD=NEW, got {text!r}")
    return PrefixMapping(old=old, new=new)


def _mappings(prefix_map: Iterable[PrefixMapping | str]) -> list[PrefixMapping]:
    parsed = [m if isinstance(m, PrefixMapping) else parse_prefix_mapping(m) for m in prefix_map]
    return sorted(parsed, key=lambda mapping: len(mapping.old.rstrip("/")), reverse=True)


def _apply_mappings(path: str, mappings: Sequence[PrefixMapping]) -> str:
    for mapping in mappings:
        mapped = mapping.apply(path)
        if mapped is not None:
            return mapped
    return path


class PathResolver:
    """Applies the longest matching prefix mapping, then joins a still-relative path to ``root``."""


    def __init__(self, root: PathLike | None, prefix_map: Iterable[PrefixMapping | str]):
        self.root = None if root is None else os.fspath(root)
        self.mappings = _mappings(prefix_map)

    def __call__(self, path: str) -> str:
        path = _apply_mappings(path, self.mappings)
        if self.root is not None and not os.path.isabs(path):
            path = os.path.join(self.root, path)
        return path


def _clean_labels(labels: Any, where: str) -> tuple[str, ...]:
    if not isinstance(labels, list):
        raise DataError(f"{where}: labels must be a list of strings, got {type(labels).__name__}")
    cleaned = []
    for label in labels:
        if not isinstance(label, str):
            raise DataError(f"{where}: labels must be strings, got {label!r}")
        label = label.strip()
        if label:
            cleaned.append(label)
    return tuple(dict.fromkeys(cleaned))


def _check_path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: image path must be a non-empty string, got {value!r}")
    return value


def _read_text(path: PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: annotation file not found") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc


def _require_images(images: list[LabelledImage], source: str) -> None:
    if not images:
        raise DataError(f"{source}: no images")


def _parse_classes(value: Any, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise DataError(f"{source}: \"classes\" must be a list of strings")
    classes = tuple(name.strip() for name in value)
    duplicates = [name for name, count in Counter(classes).items() if count > 1]
    if duplicates:
        raise DataError(f"{source}: \"classes\" repeats {duplicates[:_MAX_LISTED]}")
    return classes


def _parse_reference(document: Any, source: str, resolve: PathResolver) -> LabelledSet:
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise DataError(f"{source}: expected an object with an \"images\" list")
    images = []
    for index, entry in enumerate(document["images"]):
        where = f"{source}: images[{index}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise DataError(f"{where}: expected [path, [labels...]], got {entry!r:.80}")
        path = _check_path(entry[0], where)
        images.append(LabelledImage(resolve(path), _clean_labels(entry[1], where)))
    _require_images(images, source)
    classes = _parse_classes(document["classes"], source) if "classes" in document else None
    return LabelledSet(images=images, classes=classes, source=source, format="reference")


def _parse_coco(document: Any, source: str, resolve: PathResolver) -> LabelledSet:
    if not isinstance(document, dict) or not all(
        isinstance(document.get(key), list) for key in ("images", "annotations", "categories")
    ):
        raise DataError(f"{source}: expected COCO \"images\", \"annotations\" and \"categories\" lists")
    category_names: dict[Any, str] = {}
    for index, category in enumerate(document["categories"]):
        valid = isinstance(category, dict) and "id" in category and isinstance(category.get("name"), str)
        if not valid:
            raise DataError(f"{source}: categories[{index}]: needs an \"id\" and a string \"name\"")
        category_names[category["id"]] = category["name"].strip()
    image_labels: dict[Any, list[str]] = {}
    image_paths: dict[Any, str] = {}
    for index, image in enumerate(document["images"]):
        where = f"{source}: images[{index}]"
        if not isinstance(image, dict) or "id" not in image:
            raise DataError(f"{where}: needs an \"id\" and a \"file_name\"")
        if image["id"] in image_paths:
            raise DataError(f"{where}: repeats image id {image['id']!r}")
        image_paths[image["id"]] = resolve(_check_path(image.get("file_name"), where))
        image_labels[image["id"]] = []
    for index, annotation in enumerate(document["annotations"]):
        where = f"{source}: annotations[{index}]"
        if not isinstance(annotation, dict):
            raise DataError(f"{where}: expected an object")
        labels = image_labels.get(annotation.get("image_id"))
        if labels is None:
            raise DataError(f"{where}: unknown image_id {annotation.get('image_id')!r}")
        name = category_names.get(annotation.get("category_id"))
        if name is None:
            raise DataError(f"{where}: unknown category_id {annotation.get('category_id')!r}")
        labels.append(name)
    # Images without annotations stay, with no labels: they are negatives for every class.
    images = [
        LabelledImage(path, tuple(dict.fromkeys(image_labels[image_id])))
        for image_id, path in image_paths.items()
    ]
    _require_images(images, source)
    classes = tuple(dict.fromkeys(category_names.values()))
    return LabelledSet(images=images, classes=classes, source=source, format="coco")


def _parse_jsonl(
    text: str, source: str, resolve: PathResolver, on_error: ErrorPolicy
) -> LabelledSet:
    images = []
    problems = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{line_number}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON: {exc.msg}") from exc
            if not isinstance(record, dict) or "image" not in record or "labels" not in record:
                raise DataError(f"{where}: expected {{\"image\": path, \"labels\": [...]}}")
            path = _check_path(record["image"], where)
            images.append(LabelledImage(resolve(path), _clean_labels(record["labels"], where)))
        except DataError as exc:
            problems.append(str(exc))
    if problems and on_error == "raise":
        raise DataError(f"{len(problems)} bad line(s): {listed(problems, _MAX_LISTED, quote=False, sep='; ')}")
    _require_images(images, source)
    return LabelledSet(images=images, source=source, format="jsonl", skipped=tuple(problems))


def _detect(document: Any, source: str) -> AnnotationFormat:
    if isinstance(document, dict):
        if all(key in document for key in ("images", "annotations", "categories")):
            return "coco"
        if "annotations" in document:  # COCO-like, but a part is missing: say which, not a reference-format error
            missing = [key for key in ("images", "categories") if key not in document]
            raise DataError(
                f"{source}: looks like COCO instances but has no {' or '.join(repr(k) for k in missing)} list"
            )
        if isinstance(document.get("images"), list):
            return "reference"
    raise DataError(
        f"{source}: unrecognised annotation format (expected the reference's {{\"images\": [[path, "
        "[labels]], ...]}, COCO instances, or JSONL lines {\"image\": ..., \"labels\": [...]})"
    )


def _sniff(path: PathLike, text: str) -> tuple[AnnotationFormat, Any]:
    """The format and, for JSON documents, the parsed document (so it is parsed only once)."""
    source = str(path)
    if source.lower().endswith(_JSONL_SUFFIXES):
        return "jsonl", None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        # Several JSON values one after another: a JSONL file without the usual extension.
        if exc.msg == "Extra data":
            return "jsonl", None
        raise DataError(f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    return _detect(document, source), document


def read_annotations(
    path: PathLike,
    *,
    format: AnnotationFormat | Literal["auto"] = "auto",
    root: PathLike | None = None,
    prefix_map: Iterable[PrefixMapping | str] = (),
    on_error: ErrorPolicy = "raise",
) -> LabelledSet:
    """Read an annotation file in any supported format (``format="auto"`` detects it).

    ``reference``: the reference's split files, ``{"images": [[path, [labels...]], ...], "classes": [...]}``;
    ``classes`` is kept in file order (the reference sorts a training file's classes to index them, which
    matters only for its own one-hot layout). ``jsonl``: one ``{"image": path, "labels": [...]}`` object per
    line; blank lines are ignored. ``coco``: COCO instances JSON, label names from ``categories``, one per
    annotated category per image.

    ``prefix_map`` entries are :class:`PrefixMapping` or ``"OLD=NEW"`` strings. ``on_error`` applies
    to JSONL lines: ``"raise"`` reports every bad line (with its number) in one DataError,
    ``"skip"`` drops them and lists them in ``LabelledSet.skipped``. An empty set is always an error.
    """
    if format not in ("auto", "reference", "jsonl", "coco"):
        raise DataError(f"unknown annotation format {format!r} (reference, jsonl, coco or auto)")
    source = str(path)
    text = _read_text(path)
    resolve = PathResolver(root, prefix_map)
    document = None
    if format == "auto":
        format, document = _sniff(path, text)
    if format == "jsonl":
        return _parse_jsonl(text, source, resolve, on_error)
    if document is None:
        document = _load_json(text, source)
    if format == "reference":
        return _parse_reference(document, source, resolve)
    return _parse_coco(document, source, resolve)
