"""Labelled images for evaluation and training: what a DATA argument names, and the label space.

DATA is one annotation file (the reference's JSON, a JSONL manifest or COCO instances; see
:mod:`ramtag.data.annotations`) or WebDataset shards whose samples carry their labels in a ``.json``,
``.txt`` or ``.cls`` member (see :mod:`ramtag.data.shard_labels`).

Keys, which score tables join on: for annotation files, the image path after prefix mapping, made
relative to ``root`` when it lies under it (``ramtag tag ROOT`` keys rows the same way); for shards,
``shardname/__key__``, as ``ramtag tag`` keys shard samples (the same sample stage,
:func:`ramtag.data.shards.shard_samples`, reads both).

:func:`sample_labels` is the labels stage, the one step that train and eval add to tag's pipeline
(plan -> samples -> labels -> decode -> batch); :mod:`ramtag.data.labelled_samples` holds the datasets
and batches built on it. Labels outside the label space are dropped and counted (or refused with
``strict``); an empty label space is a :class:`~ramtag.errors.VocabularyError`.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ramtag.data.annotations import PrefixMapping, read_annotations
from ramtag.data.listing import printable
from ramtag.data.shard_labels import shard_labels
from ramtag.data.shards import is_shard_input, shard_name, shard_samples
from ramtag.data.sources import plan_inputs
from ramtag.errors import DataError, UsageError, VocabularyError
from ramtag.messages import listed

MAX_LISTED = 10
NO_LABEL_MEMBER = "no label member (.json, .txt or .cls) in sample"


# ---------------------------------------------------------------------------------------------
# What DATA names


class LabelledItem(NamedTuple):
    """One annotated image: its key, where to read it (None for shard samples) and its label names."""

    key: str
    path: str | None
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelledSource:
    """An annotation file's images, or a list of shards (whose labels are read while streaming)."""

    description: str
    items: tuple[LabelledItem, ...] = ()
    shards: tuple[str, ...] = ()
    classes: tuple[str, ...] | None = None
    """The class list the annotation file declares (reference JSON ``classes``, COCO categories)."""
    format: str = ""
    skipped_lines: tuple[str, ...] = field(default=(), repr=False)

    @property
    def is_shards(self) -> bool:
        return bool(self.shards)

    def labelled_items(self, cls_classes: Sequence[str] | None = None) -> list[LabelledItem]:
        """Every item with its labels; for shards this reads them all once (images are not decoded).

        Shard samples without a usable label member are left out: they cannot be evaluated.
        """
        if not self.is_shards:
            return list(self.items)
        return [item for item, error in scan_shard_labels(self.shards, cls_classes) if error is None]

    def union_of_labels(self, cls_classes: Sequence[str] | None = None) -> tuple[str, ...]:
        """Every label name in the data, in first-seen order."""
        items = self.labelled_items(cls_classes)
        return tuple(dict.fromkeys(label for item in items for label in item.labels))


def sample_key(url: str, key: str) -> str:
    """The row key of a shard sample, as ``ramtag tag`` writes it (:func:`ramtag.data.shards.shard_samples`)."""
    return printable(f"{printable(shard_name(url))}/{key}")


def normalise_key(key: str) -> str:
    """A key in a canonical spelling for joins: forward slashes, no ``./`` or doubled slashes."""
    text = key.replace(os.sep, "/") if os.sep != "/" else key
    return posixpath.normpath(text) if text else text


def _key_and_path(mapped: str, root: str | None) -> tuple[str, str]:
    if root is None:
        return mapped, mapped
    if os.path.isabs(mapped):
        relative = os.path.relpath(mapped, root)
        inside = not relative.startswith(os.pardir + os.sep) and relative != os.pardir
        return (relative if inside else mapped), mapped
    return mapped, os.path.join(root, mapped)


def open_labelled_source(
    data: Sequence[str] | str,
    *,
    root: str | os.PathLike | None = None,
    prefix_map: Iterable[PrefixMapping | str] = (),
    on_error: str = "raise",
) -> LabelledSource:
    """Read DATA: one annotation file, or shard paths/patterns (``.tar``, braces, globs, ``pipe:``).

    ``prefix_map`` rewrites annotation paths first (``OLD=NEW``), then ``root`` resolves the ones still
    relative; without ``root`` they name files beside the annotation file (as COCO tools read them), and
    their keys stay as written. ``on_error="skip"`` drops bad JSONL lines (listed in ``skipped_lines``)
    instead of failing.
    """
    inputs = [data] if isinstance(data, str) else list(data)
    if not inputs:
        raise UsageError("no DATA given: name an annotation file or WebDataset shards")
    shard_like = [is_shard_input(item) for item in inputs]
    if any(shard_like):
        if not all(shard_like):
            raise UsageError("DATA mixes WebDataset shards with other files; give shards or one annotation file")
        plan = plan_inputs(inputs)
        if not plan.shards:
            raise DataError(f"{' '.join(inputs)}: no shards found")
        return LabelledSource(description=" ".join(inputs), shards=tuple(plan.shards), format="webdataset")
    if len(inputs) > 1:
        raise UsageError(f"give one annotation file, not {len(inputs)} (or WebDataset shards)")
    root_text = None if root is None else os.fspath(root)
    annotations = read_annotations(inputs[0], prefix_map=prefix_map, on_error=on_error)  # type: ignore[arg-type]
    beside = os.path.dirname(os.fspath(inputs[0]))  # without --root, relative paths name files beside the file
    items = []
    for image in annotations.images:
        key, path = _key_and_path(image.path, root_text)
        if root_text is None and beside and not os.path.isabs(path):
            path = os.path.join(beside, path)
        items.append(LabelledItem(key, path, image.labels))
    return LabelledSource(
        description=str(inputs[0]),
        items=tuple(items),
        classes=annotations.classes,
        format=annotations.format,
        skipped_lines=annotations.skipped,
    )


def scan_shard_labels(
    shards: Sequence[str], cls_classes: Sequence[str] | None = None
) -> Iterator[tuple[LabelledItem, str | None]]:
    """Each shard sample's labels, with an error text for samples (or shards) that have none usable."""
    for url in shards:
        for item in shard_samples(url):
            if item.sample is None:  # a repeated key, or the shard broke: report it, go on
                yield LabelledItem(item.key, None, ()), item.error
                continue
            labels, error = sample_labels(item.sample, cls_classes)
            yield LabelledItem(item.key, None, tuple(labels or ())), error


def sample_labels(sample: dict[str, Any], cls_classes: Sequence[str] | None) -> tuple[list[str] | None, str | None]:
    """The labels stage: a shard sample's label names, or None and why it has none usable."""
    try:
        labels = shard_labels(sample, cls_classes)
    except DataError as exc:
        return None, str(exc)
    if labels is None:
        if any(name in sample for name in ("cls", ".cls", "idx", ".idx")) and cls_classes is None:
            raise UsageError("shards label samples by .cls/.idx indices: pass --labels with the label list they index")
        return None, NO_LABEL_MEMBER
    return labels, None


# ---------------------------------------------------------------------------------------------
# The label space


@dataclass(frozen=True)
class LabelSpace:
    """All labels (seen plus unseen, in vocabulary order) and the unseen ones among them."""

    labels: tuple[str, ...]
    unseen: tuple[str, ...] = ()
    origin: str = ""
    """Where the labels came from: ``--labels``, the annotation file's class list, or the data."""

    @property
    def seen(self) -> tuple[str, ...]:
        held_out = set(self.unseen)
        return tuple(label for label in self.labels if label not in held_out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "n_labels": len(self.labels),
            "n_seen": len(self.seen),
            "n_unseen": len(self.unseen),
            "labels": list(self.labels),
            "unseen": list(self.unseen),
        }


def _check_unique(labels: Sequence[str], what: str) -> None:
    repeated = [label for label, count in Counter(labels).items() if count > 1]
    if repeated:
        raise VocabularyError(f"{what} repeats {repeated[:MAX_LISTED]}")
    if not labels:
        raise VocabularyError(f"{what} is empty")


def resolve_label_space(
    source: LabelledSource,
    labels: Sequence[str] | None = None,
    unseen: Sequence[str] | None = None,
) -> LabelSpace:
    """The label space: ``labels`` if given, else the file's class list, else every label in the data.

    ``unseen`` must lie inside it. WebDataset shards labelled by ``.cls`` indices need ``labels``.
    """
    if labels is not None:
        space, origin = tuple(labels), "--labels"
    elif source.classes is not None:
        space, origin = source.classes, f"class list of {source.description}"
    else:
        space, origin = source.union_of_labels(), f"labels found in {source.description}"
    _check_unique(space, "the label space")
    held_out: tuple[str, ...] = ()
    if unseen is not None:
        held_out = tuple(unseen)
        _check_unique(held_out, "the unseen label list")
        outside = [label for label in held_out if label not in set(space)]
        if outside:
            raise VocabularyError(
                f"{len(outside)} unseen label(s) are not in the label space ({origin}): "
                f"{listed(outside, MAX_LISTED)}; list every label, seen and unseen, in --labels"
            )
    return LabelSpace(labels=space, unseen=held_out, origin=origin)
