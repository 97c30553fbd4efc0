"""The decode and batch stages every pipeline shares: a :class:`Record` per input item, :func:`decode` (bytes or a
path to a transformed tensor, or the reason it failed), :class:`FileDataset` over a files table, and
:func:`collate_records`, which stacks good images and keeps failed items aside. Nothing here raises for a bad
image: the record's ``error`` says why.

Training and evaluation use the same stages, with labels added (:mod:`ramtag.data.labelled_samples`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import torch
from torch.utils.data import Dataset, get_worker_info

from ramtag.data import storage
from ramtag.data.device_decode import DeviceJpegs, EncodedJpeg
from ramtag.data.images import PIL_LIMIT, ImageDecodeError, decode_image
from ramtag.data.listing import BASE_COLUMNS, filesystem_path
from ramtag.messages import first_line

Transform = Callable[[Any], torch.Tensor]
T = TypeVar("T")


def check_rank(rank: int, world_size: int) -> None:
    """Refuse a rank outside ``[0, world_size)`` (a programming error, not bad input)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")


def split_by_node_and_worker(items: Sequence[T], rank: int = 0, world_size: int = 1) -> list[T]:
    """This rank's and, inside a DataLoader worker, this worker's share: every ``world_size``-th item from
    ``rank`` on, then every ``num_workers``-th of those (webdataset's ``split_by_node`` + ``split_by_worker``)."""
    mine = list(items)[rank::world_size]
    info = get_worker_info()
    if info is not None and info.num_workers > 1:
        mine = mine[info.id :: info.num_workers]
    return mine



@dataclass
class Record:
    """One input item after decoding: ``image`` is set, or ``error`` says why not. With a :class:`DeviceJpegs`
    transform, ``image`` may be an :class:`EncodedJpeg` still to be decoded on the model's device."""

    key: str
    source: str
    image: torch.Tensor | EncodedJpeg | None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    unit: int = -1
    """The work unit the record belongs to (see :mod:`ramtag.data.units`), -1 outside one."""


def decode(
    data: Any, transform: Transform, max_pixels: int | None = PIL_LIMIT, draft_size: int | None = None
) -> tuple[torch.Tensor | EncodedJpeg | None, str | None]:
    """The decode stage: ``(transform(image), None)``, or ``(None, reason)`` for an image that cannot be used.
    A :class:`DeviceJpegs` transform passes the JPEGs it takes on undecoded, and the rest to its CPU transform."""
    if isinstance(transform, DeviceJpegs):
        encoded, data = transform.encode(data, max_pixels)
        if encoded is not None:
            return encoded, None
    try:
        image = decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
        return transform(image), None
    except ImageDecodeError as exc:
        return None, exc.reason
    except Exception as exc:  # a bad image must never end the run
        return None, f"cannot decode: {first_line(exc)}"


class FileDataset(Dataset):
    """Map-style dataset over a files table (usually ``plan.files_for_rank(...)``)."""

    def __init__(
        self,
        files: pa.Table,
        transform: Transform,
        *,
        max_pixels: int | None = PIL_LIMIT,
        draft_size: int | None = None,
    ) -> None:
        self.files = files.combine_chunks()
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self._extra_names = [name for name in files.column_names if name not in BASE_COLUMNS]

    def __len__(self) -> int:
        return self.files.num_rows

    def __getitem__(self, index: int) -> Record:
        row = {name: self.files[name][index].as_py() for name in BASE_COLUMNS}
        extra = {name: self.files[name][index].as_py() for name in self._extra_names}
        if row["error"] is not None or row["path"] is None:
            return Record(row["key"], row["source"], None, row["error"] or "no path", extra)
        path = filesystem_path(row["path"])
        if storage.scheme(path) is not None and not path.startswith("file://"):
            data, error = storage.read_listed_image(path)
            if error is not None:
                return Record(row["key"], row["source"], None, error, extra)
        else:
            data = path
        image, error = decode(data, self.transform, self.max_pixels, self.draft_size)
        return Record(row["key"], row["source"], image, error, extra)


@dataclass
class Batch:
    """Decoded images of one batch, with the failed items kept aside (never dropped)."""

    images: torch.Tensor | None
    keys: list[str]
    sources: list[str]
    extra: dict[str, list[Any]]
    failed_keys: list[str]
    failed_sources: list[str]
    failed_errors: list[str]
    failed_extra: dict[str, list[Any]]
    units: list[int] = field(default_factory=list)
    failed_units: list[int] = field(default_factory=list)
    ended: list[Any] = field(default_factory=list)
    """Work units whose last record came before the end of this batch (:class:`ramtag.data.units.UnitEnd`)."""
    encoded: list[EncodedJpeg] = field(default_factory=list)
    """JPEGs still to decode on the device (:class:`DeviceJpegs`); ``images`` then holds the other good rows."""
    encoded_at: list[int] = field(default_factory=list)
    """The row (index into ``keys``) of each of ``encoded``."""

    def __len__(self) -> int:
        return len(self.keys) + len(self.failed_keys)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self

    def fail_rows(self, errors: dict[int, str]) -> None:
        """Move good rows (by index into ``keys``) to the failed ones, with their reasons; ``images`` is the
        caller's to match (see :func:`ramtag.data.device_batch.join_device_images`)."""
        names = list(self.extra)
        for index in sorted(errors):
            self.failed_keys.append(self.keys[index])
            self.failed_sources.append(self.sources[index])
            self.failed_errors.append(errors[index])
            self.failed_units.append(self.units[index])
            for name in names:
                self.failed_extra.setdefault(name, []).append(self.extra[name][index])
        keep = [index for index in range(len(self.keys)) if index not in errors]
        self.keys = [self.keys[index] for index in keep]
        self.sources = [self.sources[index] for index in keep]
        self.units = [self.units[index] for index in keep]
        self.extra = {name: [values[index] for index in keep] for name, values in self.extra.items()}


def _columns(records: Sequence[Record], names: Sequence[str]) -> dict[str, list[Any]]:
    return {name: [record.extra.get(name) for record in records] for name in names}


def collate_records(records: Sequence[Record]) -> Batch:
    """DataLoader ``collate_fn``: stack good images, keep failed records aside (and JPEGs still encoded)."""
    good = [record for record in records if record.image is not None]
    bad = [record for record in records if record.image is None]
    names = sorted({name for record in records for name in record.extra})
    encoded_at = [index for index, record in enumerate(good) if isinstance(record.image, EncodedJpeg)]
    decoded = [record.image for record in good if not isinstance(record.image, EncodedJpeg)]
    return Batch(
        images=torch.stack(decoded) if decoded else None,
        keys=[record.key for record in good],
        sources=[record.source for record in good],
        extra=_columns(good, names),
        failed_keys=[record.key for record in bad],
        failed_sources=[record.source for record in bad],
        failed_errors=[record.error or "cannot decode" for record in bad],
        failed_extra=_columns(bad, names),
        units=[record.unit for record in good],
        failed_units=[record.unit for record in bad],
        encoded=[good[index].image for index in encoded_at],
        encoded_at=encoded_at,
    )
