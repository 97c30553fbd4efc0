"""Labelled images for evaluation and training: from a DATA argument to (image, multi-hot, key) samples.

DATA is one annotation file (the reference's JSON, a JSONL manifest or COCO instances; see
:mod:`ramtag.data.annotations`) or WebDataset shards whose samples carry their labels in a ``.json``,
``.txt`` or ``.cls`` member (see :mod:`ramtag.data.shard_labels`).

Keys, which score tables join on: for annotation files, the image path after prefix mapping, made
relative to ``root`` when it lies under it (``ramtag tag ROOT`` keys rows the same way); for shards,
``shardname/__key__``, as ``ramtag tag`` keys shard samples.

Nothing here raises for one bad image: a missing or corrupt image, or a shard sample without a label
member, becomes a failed sample that the collate function sets aside and :class:`LabelTally` counts
and lists. Labels outside the label space are dropped and counted (or refused with ``strict``); an
empty set is a :class:`~ramtag.errors.DataError`.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ramtag.data.annotations import PrefixMapping, read_annotations
from ramtag.data.images import PIL_LIMIT, ImageDecodeError, decode_image
from ramtag.data.shard_labels import shard_labels
from ramtag.data.sources import SHARD_EXTENSIONS, check_rank, iter_shard_samples, plan_inputs, shard_name
from ramtag.errors import DataError, RamtagError, UsageError, VocabularyError
from ramtag.messages import listed

Transform = Callable[[Any], torch.Tensor]

_MAX_LISTED = 10
NO_LABEL_MEMBER = "no label member (.json, .txt or .cls) in sample"


class LabelledItem(NamedTuple):
    """One annotated image: its key, where to read it (None for shard samples) and its label names."""

    key: str
    path: str | None
    labels: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# What DATA names


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


def _looks_like_shard(item: str) -> bool:
    lowered = item.split("?", 1)[0].lower()
    return item.startswith("pipe:") or lowered.endswith(SHARD_EXTENSIONS)


def sample_key(url: str, key: str) -> str:
    """The row key of a shard sample, as ``ramtag tag`` writes it."""
    return f"{shard_name(url)}/{key}"


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
    shard_like = [_looks_like_shard(item) for item in inputs]
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
        count = 0
        try:
            for sample in iter_shard_samples(url):
                count += 1
                key = sample_key(url, sample["__key__"])
                labels, error = _sample_labels(sample, cls_classes)
                yield LabelledItem(key, None, tuple(labels or ())), error
        except UsageError:
            raise
        except Exception as exc:  # tar and pipe errors: report the shard, go on
            yield LabelledItem(sample_key(url, ""), None, ()), _shard_error(exc, count)


def _sample_labels(sample: dict[str, Any], cls_classes: Sequence[str] | None) -> tuple[list[str] | None, str | None]:
    try:
        labels = shard_labels(sample, cls_classes)
    except DataError as exc:
        return None, str(exc)
    if labels is None:
        if any(name in sample for name in ("cls", ".cls", "idx", ".idx")) and cls_classes is None:
            raise UsageError("shards label samples by .cls/.idx indices: pass --labels with the label list they index")
        return None, NO_LABEL_MEMBER
    return labels, None


def _shard_error(exc: BaseException, count: int) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = f" after {count} sample(s)" if count else ""
    return f"cannot read shard{where}: {text}"


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
        raise VocabularyError(f"{what} repeats {repeated[:_MAX_LISTED]}")
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
                f"{listed(outside, _MAX_LISTED)}; list every label, seen and unseen, in --labels"
            )
    return LabelSpace(labels=space, unseen=held_out, origin=origin)


# ---------------------------------------------------------------------------------------------
# Samples and batches


class LabelledSample(NamedTuple):
    """What the datasets yield: ``image`` is None when ``error`` says why it could not be used."""

    image: torch.Tensor | None
    target: torch.Tensor
    key: str
    error: str | None
    dropped: tuple[str, ...]
    """Labels of this image outside the label space (dropped from ``target``)."""
    order: tuple[int, int]
    """Position in the whole set (item index, or shard index and sample number), for merging ranks."""
    fatal: RamtagError | None = None
    """An error that ends the pass (--strict-labels, a refused shard), carried rather than raised: a DataLoader
    worker that raised would hand the main process the error's type with a traceback as its message."""


@dataclass
class LabelledBatch:
    """Good samples stacked; failed ones set aside with their reasons."""

    images: torch.Tensor | None
    targets: torch.Tensor
    keys: list[str]
    orders: list[tuple[int, int]]
    failed: list[tuple[str, str]]
    dropped: Counter[str]
    fatal: RamtagError | None = None
    """The first sample's error that ends the pass; :func:`checked_batches` raises it."""

    def __len__(self) -> int:
        return len(self.keys)


def collate_labelled(samples: Sequence[LabelledSample]) -> LabelledBatch:
    """DataLoader ``collate_fn`` for the labelled datasets."""
    good = [sample for sample in samples if sample.image is not None]
    width = samples[0].target.shape[-1] if samples else 0
    dropped: Counter[str] = Counter()
    for sample in samples:
        dropped.update(sample.dropped)
    return LabelledBatch(
        images=torch.stack([sample.image for sample in good]) if good else None,  # type: ignore[misc]
        targets=torch.stack([sample.target for sample in good]) if good else torch.zeros((0, width)),
        keys=[sample.key for sample in good],
        orders=[sample.order for sample in good],
        failed=[
            (sample.key, sample.error or "cannot decode")
            for sample in samples
            if sample.image is None and sample.fatal is None
        ],
        dropped=dropped,
        fatal=next((sample.fatal for sample in samples if sample.fatal is not None), None),
    )


def checked_batches(batches: Iterable[LabelledBatch]) -> Iterator[LabelledBatch]:
    """The batches of a DataLoader over a labelled dataset; the error a sample carries is raised here, in the
    main process, with its own type and message."""
    for batch in batches:
        if batch.fatal is not None:
            raise batch.fatal
        yield batch


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
                f"{len(self.dropped)} distinct: {_counted(self.dropped, 5)}"
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


def _decode(data: Any, transform: Transform, max_pixels: int | None) -> tuple[torch.Tensor | None, str | None]:
    try:
        return transform(decode_image(data, max_pixels=max_pixels)), None
    except ImageDecodeError as exc:
        return None, exc.reason
    except Exception as exc:  # a bad image must never end a run
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"cannot decode: {text}"


def _outside(labels: Sequence[str], space: frozenset[str]) -> tuple[str, ...]:
    return tuple(label for label in labels if label not in space)


def _counted(labels: Counter[str], limit: int) -> str:
    """``'cat' (12), 'dog' (3) and 4 more``: the most common first."""
    return listed((f"{label!r} ({count})" for label, count in labels.most_common()), limit, quote=False)


def _strict_error(where: str, dropped: Counter[str]) -> DataError:
    return DataError(
        f"{where}: {len(dropped)} label(s) outside the label space: {_counted(dropped, _MAX_LISTED)} (--strict-labels)"
    )


def check_strict_labels(items: Iterable[LabelledItem], label_space: Iterable[str], where: str) -> None:
    """Refuse (``--strict-labels``) items that carry labels outside ``label_space``, listing them."""
    known = frozenset(label_space)
    dropped = Counter(label for item in items for label in item.labels if label not in known)
    if dropped:
        raise _strict_error(where, dropped)


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
        self.transform = transform
        self.max_pixels = max_pixels
        self._column = {label: index for index, label in enumerate(self.classes)}
        self._space = frozenset(label_space if label_space is not None else classes)
        self.items = list(items)[rank::world_size]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> LabelledSample:
        order, item = self.items[index]
        target = _multi_hot(item.labels, self._column, len(self.classes))
        dropped = _outside(item.labels, self._space)
        image, error = _decode(item.path, self.transform, self.max_pixels)
        if error is not None and item.path != item.key and not os.path.exists(item.path):
            error = f"{error} ({item.path})"  # where it was looked for: the key is the path as written
        return LabelledSample(image, target, item.key, error, dropped, (order, 0))


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
        mine = list(enumerate(self.shards))[self.rank :: self.world_size]
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            mine = mine[info.id :: info.num_workers]
        return mine

    def __iter__(self) -> Iterator[LabelledSample]:
        column = {label: index for index, label in enumerate(self.classes)}
        space = frozenset(self.label_space)
        width = len(self.classes)
        for shard_index, url in self.assigned_shards():
            count = 0
            try:
                for sample in iter_shard_samples(url):
                    count += 1
                    key = sample_key(url, sample["__key__"])
                    labels, error = _sample_labels(sample, self.cls_classes)
                    empty = torch.zeros(width)
                    if labels is None:
                        yield LabelledSample(None, empty, key, error, (), (shard_index, count))
                        continue
                    dropped = _outside(labels, space)
                    if dropped and self.strict:
                        raise _strict_error(key, Counter(dropped))
                    if self.require_any is not None and not self.require_any.intersection(labels):
                        continue
                    data = next((sample[m] for m in _IMAGE_MEMBERS if m in sample), None)
                    if data is None:
                        image, error = None, "no image in sample"
                    else:
                        image, error = _decode(data, self.transform, self.max_pixels)
                    target = _multi_hot(labels, column, width)
                    yield LabelledSample(image, target, key, error, dropped, (shard_index, count))
            except (DataError, UsageError) as error:  # ends the pass: carried, not raised (LabelledSample.fatal)
                yield LabelledSample(None, torch.zeros(width), sample_key(url, ""), None, (), (shard_index, count),
                                     fatal=error)
                return
            except Exception as exc:  # a broken shard is one failure, not the end of the run
                yield LabelledSample(
                    None,
                    torch.zeros(width),
                    sample_key(url, ""),
                    _shard_error(exc, count),
                    (),
                    (shard_index, count + 1),
                )


_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "image")


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


__all__ = [
    "LabelSpace",
    "LabelTally",
    "LabelledBatch",
    "LabelledFiles",
    "LabelledItem",
    "LabelledSample",
    "LabelledShards",
    "LabelledSource",
    "check_strict_labels",
    "checked_batches",
    "collate_labelled",
    "labelled_dataset",
    "normalise_key",
    "open_labelled_source",
    "resolve_label_space",
    "sample_key",
    "scan_shard_labels",
    "select_items",
]
