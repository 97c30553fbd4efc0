"""Label names from a WebDataset sample's label member: ``.json``, ``.txt``, ``.idx`` or ``.cls``.

A sample is the dict webdataset yields before decoding (member values are bytes) or after
(``.json`` already parsed, ``.cls`` already an int, ``.txt`` already a str); both are accepted.
``.idx`` holds several class indices (space- or comma-separated); webdataset's default decoder leaves
it as bytes, whereas it decodes ``.cls`` with ``int()`` and so fails on more than one index.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ramtag.errors import DataError

_INT_SEPARATORS = re.compile(r"[\s,]+")


def _text(value: Any, member: str) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f".{member} member is not UTF-8 text") from exc
    if isinstance(value, str):
        return value
    raise DataError(f".{member} member has unexpected type {type(value).__name__}")


def _clean(labels: Sequence[Any], member: str) -> list[str]:
    out: list[str] = []
    for label in labels:
        if not isinstance(label, str):
            raise DataError(f".{member} labels must be strings, got {type(label).__name__}")
        label = label.strip()
        if label and label not in out:
            out.append(label)
    return out


def _parsed_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        try:
            return json.loads(_text(value, "json"))
        except json.JSONDecodeError as exc:
            raise DataError(f".json member is not valid JSON: {exc.msg}") from exc
    return value


def labels_from_json(value: Any) -> list[str]:
    """A JSON list of names, or an object with a ``"labels"`` list."""
    value = _parsed_json(value)
    if isinstance(value, Mapping):
        if "labels" not in value:
            raise DataError('.json member is an object without a "labels" key')
        value = value["labels"]
    if not isinstance(value, list):
        raise DataError(f".json labels must be a list, got {type(value).__name__}")
    return _clean(value, "json")


def labels_from_txt(value: Any) -> list[str]:
    """One label per line, or, on a single line, comma-separated labels."""
    text = _text(value, "txt")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) == 1 and "," in lines[0]:
        lines = lines[0].split(",")
    return _clean(lines, "txt")


def labels_from_cls(value: Any, classes: Sequence[str]) -> list[str]:
    """Integer indices into ``classes``, separated by spaces, commas or newlines (or one int).

    Reads both ``.cls`` and ``.idx`` members.
    """
    if isinstance(value, bool):
        raise DataError(".cls member must hold integers")
    if isinstance(value, int):
        indices = [value]
    elif isinstance(value, (list, tuple)):
        indices = list(value)
    else:
        tokens = [t for t in _INT_SEPARATORS.split(_text(value, "cls").strip()) if t]
        try:
            indices = [int(t) for t in tokens]
        except ValueError as exc:
            raise DataError(f".cls member must hold integers: {exc}") from exc
    out: list[str] = []
    for index in indices:
        if not isinstance(index, int) or isinstance(index, bool):
            raise DataError(f".cls member must hold integers, got {index!r}")
        if not 0 <= index < len(classes):
            raise DataError(f".cls index {index} is outside the {len(classes)} classes")
        if classes[index] not in out:
            out.append(classes[index])
    return out


def _member(sample: Mapping[str, Any], ext: str) -> Any:
    for key in (ext, "." + ext):
        if key in sample:
            return sample[key]
    return None


def shard_labels(sample: Mapping[str, Any], classes: Sequence[str] | None = None) -> list[str] | None:
    """The labels of a WebDataset sample, from its first member among ``.json``, ``.txt``, ``.idx``, ``.cls``.

    ``.idx`` and ``.cls`` are only used with ``classes`` (the list their indices point into). A ``.json`` object without
    a ``"labels"`` key is other metadata and is skipped. Returns None when the sample has no usable
    label member, so unlabelled shards can still be tagged.
    """
    value = _member(sample, "json")
    if value is not None:
        value = _parsed_json(value)
        if not (isinstance(value, Mapping) and "labels" not in value):
            return labels_from_json(value)
    value = _member(sample, "txt")
    if value is not None:
        return labels_from_txt(value)
    if classes is not None:
        for ext in ("idx", "cls"):
            value = _member(sample, ext)
            if value is not None:
                return labels_from_cls(value, classes)
    return None
