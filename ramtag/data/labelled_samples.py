"""Labelled samples and batches: tag's sample, decode and batch stages with the labels stage added.

A :class:`LabelledSample` is a :class:`~ramtag.data.records.Record` that also carries its multi-hot target.
Annotation files are read by tag's :class:`~ramtag.data.records.FileDataset` over a files table of their
paths; shards by tag's sample stage (:func:`~ramtag.data.shards.shard_samples`), with
:func:`~ramtag.data.labelled.sample_labels` before decoding so that unlabelled or unwanted samples are
never decoded; both decode with :func:`~ramtag.data.records.decode` and batch with
:func:`~ramtag.data.records.collate_records`.

Nothing here raises for one bad image: a missing or corrupt image, or a shard sample without a label
member, becomes a failed sample that :func:`collate_labelled` sets aside and :class:`LabelTally` counts
and lists.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch.utils.data import Dataset, IterableDataset

from ramtag.data.images import PIL_LIMIT
from ramtag.data.labelled import MAX_LISTED, LabelledItem, LabelledSource, sample_labels
from ramtag.data.listing import BASE_COLUMNS, storable_path
from ramtag.data.records import (
    FileDataset,
    Record,
    Transform,
    check_rank,
    collate_records,
    decode,
    split_by_node_and_worker,
)
from ramtag.data.shards import missing_image, sample_image, shard_samples
from ramtag.errors import DataError, VocabularyError
from ramtag.messages import listed


@dataclass
class LabelledSample(Record):
    """A record with the labels stage's output; ``image`` is None when ``error`` says why it could not be used."""

    target: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    """Multi-hot over the classes."""
    dropped: tuple[str, ...] = ()
    """Labels of this image outside the label space (dropped from ``target``)."""
    order: tuple[int, int] = (0, 0)
    """Position in the whole set (item index, or shard index and sample number), for merging ranks."""


@dataclass
class LabelledBatch:
    """Good samples stacked; failed ones set aside with their reasons."""

    images: torch.Tensor | None
    targets: torch.Tensor
    keys: list[str]
    orders: list[tuple[int, int]]
    failed: list[tuple[str, str]]
    dropped: Counter[str]

    def __len__(self) -> int:
        return len(self.keys)


def collate_labelled(samples: Sequence[LabelledSample]) -> LabelledBatch:
    """DataLoader ``collate_fn`` for the labelled datasets: tag's batching, plus the targets."""
    batch = collate_records(samples)
    good = [sample for sample in samples if sample.image is not None]
    width = samples[0].target.shape[-1] if samples else 0
    dropped: Counter[str] = Counter()
    for sample in samples:
        dropped.update(sample.dropped)
    return LabelledBatch(
        images=batch.images,
        targets=torch.stack([sample.target for sample in good]) if good else torch.zeros((0, width)),
        keys=batch.keys,
        orders=[sample.order for sample in good],
        failed=list(zip(batch.failed_keys, batch.failed_errors)),
        dropped=dropped,
    )


@dataclass
class LabelTally:
    """What a pass over a labelled set met: images used, failures, dropped labels, unlabelled images."""

    images: int = 0
    images_without_labels: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)

    def update(self, batch: LabelledBatch) -> None:
        self.images += len(batch)
        if len(batch):
            self.images_without_labels += int((batch.targets.sum(dim=1) == 0).sum())
        self.failed.extend(batch.failed)
        self.dropped.update(batch.dropped)

    @classmethod
    def merged(cls, tallies: Iterable[LabelTally]) -> LabelTally:
        total = cls()
        for tally in tallies:
            total.images += tally.images
            total.images_without_labels += tally.images_without_labels
            total.failed.extend(tally.failed)
            total.dropped.update(tally.dropped)
        return total

    def messages(self) -> list[str]:
        """One-line warnings for a log."""
        out = []
        if self.failed:
            shown = listed((f"{key}: {error}" for key, error in self.failed), quote=False, sep="; ")
            out.append(f"{len(self.failed)} image(s) skipped: {shown}")
        if self.dropped:
            out.append(
                f"{sum(self.dropped.values())} label(s) outside the label space dropped, "
                f"{len(self.dropped)} distinct: {counted(self.dropped, 5)}"
            )
        if self.images_without_labels:
            out.append(
                f"{self.images_without_labels} image(s) have no label in the label space: negatives for every label"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "images_without_labels": self.images_without_labels,
            "failed": len(self.failed),
            "failed_images": [{"key": key, "error": error} for key, error in self.failed],
            "dropped_label_pairs": sum(self.dropped.values()),
            "dropped_labels": dict(sorted(self.dropped.items(), key=lambda item: (-item[1], item[0]))),
        }


def _multi_hot(labels: Sequence[str], column: dict[str, int], width: int) -> torch.Tensor:
    target = torch.zeros(width, dtype=torch.float32)
    for label in labels:
        index = column.get(label)
        if index is not None:
            target[index] = 1.0
    return target


def _outside(labels: Sequence[str], space: frozenset[str]) -> tuple[str, ...]:
    return tuple(label for label in labels if label not in space)


def counted(labels: Counter[str], limit: int) -> str:
    """``'cat' (12), 'dog' (3) and 4 more``: the most common first."""
    return listed((f"{label!r} ({count})" for label, count in labels.most_common()), limit, quote=False)


def strict_error(where: str, dropped: Counter[str]) -> DataError:
    return DataError(
        f"{where}: {len(dropped)} label(s) outside the label space: {counted(dropped, MAX_LISTED)} (--strict-labels)"
    )


def check_strict_labels(items: Iterable[LabelledItem], label_space: Iterable[str], where: str) -> None:
    """Refuse (``--strict-labels``) items that carry labels outside ``label_space``, listing them."""
    known = frozenset(label_space)
    dropped = Counter(label for item in items for label in item.labels if label not in known)
    if dropped:
        raise strict_error(where, dropped)


def select_items(
    items: Sequence[LabelledItem], require_any: Sequence[str] | None = None
) -> list[tuple[int, LabelledItem]]:
    """Items (with their index) that carry at least one of ``require_any`` (all items when None)."""
    if require_any is None:
        return list(enumerate(items))
    wanted = frozenset(require_any)
    return [(index, item) for index, item in enumerate(items) if wanted.intersection(item.labels)]


class LabelledFiles(Dataset):
    """Map-style dataset over annotated image files; rank ``r`` of ``w`` holds every ``w``-th item."""

    def __init__(
        self,
        items: Sequence[tuple[int, LabelledItem]],
        classes: Sequence[str],
        transform: Transform,
        *,
        label_space: Sequence[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int | None = PIL_LIMIT,
    ) -> None:
        check_rank(rank, world_size)
        self.classes = tuple(classes)
        self._column = {label: index for index, label in enumerate(self.classes)}
        self._space = frozenset(label_space if label_space is not None else classes)
        self.items = list(items)[rank::world_size]
        self.files = FileDataset(_files_table(self.items), transform, max_pixels=max_pixels)
        """Tag's reader over the same paths: the labels are all this dataset adds."""

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> LabelledSample:
        order, item = self.items[index]
        target = _multi_hot(item.labels, self._column, len(self.classes))
        dropped = _outside(item.labels, self._space)
        record = self.files[index]
        error = record.error
        if error is not None and item.path != item.key and not os.path.exists(item.path):
            error = f"{error} ({item.path})"  # where it was looked for: the key is the path as written
        return LabelledSample(
            record.key, record.source, record.image, error, target=target, dropped=dropped, order=(order, 0)
        )


def _files_table(items: Sequence[tuple[int, LabelledItem]]) -> pa.Table:
    """The files table (:mod:`ramtag.data.listing`) of annotated items, read as ``ramtag tag`` reads a manifest."""
    paths = [item.path for _, item in items]
    columns = {
        "key": [item.key for _, item in items],
        "source": paths,
        "path": [storable_path(path) if path is not None else None for path in paths],
        "error": [None] * len(items),
    }
    return pa.table({name: pa.array(columns[name], pa.string()) for name in BASE_COLUMNS})


class LabelledShards(IterableDataset):
    """Iterable dataset over labelled WebDataset shards, split by rank and by DataLoader worker.

    Labels come from each sample's ``.json``, ``.txt`` or ``.cls`` member (``.cls`` indexes
    ``cls_classes``). Samples without any of ``require_any`` are passed over before decoding.
    """

    def __init__(
        self,
        shards: Sequence[str],
        classes: Sequence[str],
        transform: Transform,
        *,
        label_space: Sequence[str] | None = None,
        cls_classes: Sequence[str] | None = None,
        require_any: Sequence[str] | None = None,
        strict: bool = False,
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int | None = PIL_LIMIT,
    ) -> None:
        check_rank(rank, world_size)
        self.shards = list(shards)
        self.classes = tuple(classes)
        self.transform = transform
        self.label_space = tuple(label_space if label_space is not None else classes)
        self.cls_classes = tuple(cls_classes) if cls_classes is not None else self.label_space
        self.require_any = frozenset(require_any) if require_any is not None else None
        self.strict = strict
        self.rank = rank
        self.world_size = world_size
        self.max_pixels = max_pixels

    def assigned_shards(self) -> list[tuple[int, str]]:
        """(global index, url) of the shards this rank and, inside a DataLoader worker, this worker read."""
        return split_by_node_and_worker(list(enumerate(self.shards)), self.rank, self.world_size)

    def __iter__(self) -> Iterator[LabelledSample]:
        column = {label: index for index, label in enumerate(self.classes)}
        space = frozenset(self.label_space)
        width = len(self.classes)
        for shard_index, url in self.assigned_shards():
            for item in shard_samples(url):  # the sample stage ``ramtag tag`` reads shards with
                order = (shard_index, item.number)
                if item.sample is None:  # a repeated key, or the shard's own error row
                    yield LabelledSample(item.key, url, None, item.error, target=torch.zeros(width), order=order)
                    continue
                labels, error = sample_labels(item.sample, self.cls_classes)  # the labels stage
                if labels is None:
                    yield LabelledSample(item.key, url, None, error, target=torch.zeros(width), order=order)
                    continue
                dropped = _outside(labels, space)
                if dropped and self.strict:
                    raise strict_error(item.key, Counter(dropped))
                if self.require_any is not None and not self.require_any.intersection(labels):
                    continue
                data = sample_image(item.sample)
                if data is None:
                    image, error = None, missing_image(item.sample)
                else:
                    image, error = decode(data, self.transform, self.max_pixels)
                target = _multi_hot(labels, column, width)
                yield LabelledSample(item.key, url, image, error, target=target, dropped=dropped, order=order)


def labelled_dataset(
    source: LabelledSource,
    classes: Sequence[str],
    transform: Transform,
    *,
    label_space: Sequence[str] | None = None,
    require_any: Sequence[str] | None = None,
    strict: bool = False,
    rank: int = 0,
    world_size: int = 1,
    max_pixels: int | None = PIL_LIMIT,
) -> LabelledFiles | LabelledShards:
    """The dataset of ``source`` with targets over ``classes``.

    ``label_space`` (default ``classes``) is what counts as a known label: others are dropped and
    counted, or refused with ``strict``. ``require_any`` keeps only images with at least one of those
    labels (the ZSL set: images with an unseen label). For annotation files an empty selection is a
    DataError here; for shards the caller checks the tally after the pass.
    """
    if not classes:
        raise VocabularyError("no labels to evaluate")
    space = tuple(label_space) if label_space is not None else tuple(classes)
    if source.is_shards:
        return LabelledShards(
            source.shards, classes, transform, label_space=space, require_any=require_any,
            strict=strict, rank=rank, world_size=world_size, max_pixels=max_pixels,
        )
    if strict:
        check_strict_labels(source.items, space, source.description)
    selected = select_items(source.items, require_any)
    if not selected:
        if require_any is not None:
            raise DataError(
                f"{source.description}: no image has any of the {len(require_any)} required label(s) "
                f"({listed(require_any)})"
            )
        raise DataError(f"{source.description}: no images")
    return LabelledFiles(
        selected, classes, transform, label_space=space, rank=rank, world_size=world_size, max_pixels=max_pixels
    )
