"""WebDataset shards: naming, checking, reading, and the sample stage that tag, train and eval share.

A shard is a local tar, a brace pattern, a ``pipe:`` command or a URL. Its row keys are
``shardname/__key__``. ramtag reads tars with its own streaming reader rather than webdataset's
``tarfile_to_samples`` because it must write a row where webdataset would drop one silently: a member
that is a link, an archive cut off before its end blocks, a key whose members are not consecutive.

:func:`shard_samples` is the one sample stage over a shard: each sample with its key, a row for a
repeated key, and one error row ``shardname/`` when the shard cannot be opened or breaks mid-way.
:class:`ShardDataset` (tag) decodes its samples; :mod:`ramtag.data.labelled` (train, eval) adds labels
first.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from torch.utils.data import IterableDataset

from ramtag.data import storage
from ramtag.data.images import PIL_LIMIT
from ramtag.data.listing import has_suffix, printable
from ramtag.data.records import Record, Transform, check_rank, decode, split_by_node_and_worker
from ramtag.data.shard_columns import ShardColumn, check_sample_has, sample_values, shard_columns_schema
from ramtag.errors import DataError
from ramtag.messages import first_line

SHARD_EXTENSIONS: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
SHARD_IMAGE_MEMBERS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "image")
"""Members of a shard sample tried, in order, as its image."""
REPEATED_KEY = "key repeats an earlier sample of the shard (members of a sample must be consecutive)"


def is_shard_input(item: str) -> bool:
    """Whether a command-line input (a path, pattern or ``pipe:`` command) names WebDataset shards."""
    return item.startswith("pipe:") or has_suffix(item.split("?", 1)[0], SHARD_EXTENSIONS)


def checked_shard(url: str) -> str:
    """``url`` after refusing an empty pipe command or a local shard that is not there."""
    if url.startswith("pipe:"):
        if not url[5:].strip():
            raise DataError(f"{url!r}: empty pipe command")
        return url
    if storage.is_remote(url):  # one request per bucket, not per shard: a missing shard becomes its error row
        storage.check_bucket_once(url)
        return url
    if "://" in url and not url.startswith("file://"):
        return url
    path = url[len("file://") :] if url.startswith("file://") else url
    if not os.path.isfile(path):
        raise DataError(f"{url}: no such shard")
    return url


def shard_schema(url: str, columns: Sequence[ShardColumn]) -> pa.Schema:
    """The shard columns' fields, after checking the first sample of the first shard has each name."""
    try:
        samples = iter_shard_samples(url)
        first = next(samples, None)
        samples.close()
    except Exception:  # an unreadable shard becomes its error row when the run reads it
        first = None
    if first is not None:
        check_sample_has(first, columns, shard_name(url))
    return shard_columns_schema(columns)


def refuse_shared_shard_names(shards: Sequence[str]) -> None:
    """Row keys start with the shard's file name: two shards with one name would give their samples one key."""
    first: dict[str, str] = {}
    for url in shards:
        name = shard_name(url)
        if name in first:
            raise DataError(
                f"shards {first[name]} and {url} share the name {name!r}, so their row keys would collide; "
                "rename one, or tag them in separate runs"
            )
        first[name] = url



def shard_split_problem(n_shards: int, world_size: int, workers: int) -> str | None:
    """Report fewer shards than ranks x workers (idle ranks or workers), before a run starts."""
    if n_shards == 0:
        return None
    slots = world_size * max(workers, 1)
    if n_shards >= slots:
        return None
    if n_shards < world_size:
        return (
            f"{n_shards} shard(s) for {world_size} ranks: {world_size - n_shards} rank(s) would get no shard; "
            "use fewer processes or split the shards"
        )
    return (
        f"{n_shards} shard(s) for {world_size} rank(s) x {workers} worker(s): some workers would idle; "
        f"use --workers {max(1, n_shards // world_size)} or more shards"
    )


def shard_name(url: str) -> str:
    """The name a shard contributes to row keys: its file name (of the tar a pipe command reads)."""
    if url.startswith("pipe:"):
        tokens = url[5:].split()
        tars = [token for token in tokens if has_suffix(token.split("?", 1)[0], SHARD_EXTENSIONS)]
        url = tars[-1] if tars else (tokens[-1] if tokens else url)
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or url


_PIPE_STATUS = re.compile(r": exit (\d+) \(")


def shard_error(exc: BaseException) -> str:
    """Why a shard could not be read, in one line (a failed ``pipe:`` command by its exit status)."""
    status = _PIPE_STATUS.search(str(exc)) if isinstance(exc, OSError) else None
    if status is not None:  # webdataset's Pipe reports the whole Popen call
        return f"command exited with status {status.group(1)}"
    return first_line(exc)


LINK_MEMBERS = "__links__"
"""Sample entry listing the suffixes of members that are symbolic or hard links (their bytes are not read)."""


def iter_shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Yield raw webdataset samples (``__key__`` plus member bytes) of one shard, in order.

    Errors propagate; :func:`shard_samples` turns them into one error row for the shard.
    """
    import webdataset

    from ramtag.data.pipes import open_pipe

    if url.startswith("pipe:"):
        stream = open_pipe(url[len("pipe:"):])
    else:
        stream = storage.open_input(url) if storage.is_remote(url) else webdataset.gopen(url, "rb")
    try:
        current: dict[str, Any] | None = None
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not (member.isreg() or member.islnk() or member.issym()):
                    continue
                prefix, suffix = _split_member_name(member.name)
                if prefix is None:
                    continue
                if current is None or current["__key__"] != prefix:
                    if current is not None:
                        yield current
                    current = {"__key__": prefix}
                if member.isreg():
                    handle = archive.extractfile(member)
                    current[suffix.lower()] = handle.read() if handle is not None else b""
                else:  # a stream cannot go back to a link's target; the sample records it instead of vanishing
                    current.setdefault(LINK_MEMBERS, []).append(suffix.lower())
                archive.members = []  # streaming: do not keep every member header in memory
            if current is not None:  # its members all arrived whole
                yield current
            # tarfile ends quietly when the data stops at a member boundary; a whole archive ends with zero
            # blocks, which tarfile reads past (so its stream is ahead of its offset). A cut-off download is not.
            if archive.fileobj.tell() == archive.offset:
                raise tarfile.ReadError("the archive ends without its end-of-archive blocks (cut off?)")
    finally:
        stream.close()


def _split_member_name(name: str) -> tuple[str | None, str]:
    """webdataset's convention: the key is everything before the first dot of the last component."""
    directory, _, base = name.rpartition("/")
    if base.startswith("__") and base.endswith("__"):
        return None, ""
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{directory}/{stem}" if directory else stem), suffix


def sample_image(sample: Mapping[str, Any]) -> bytes | None:
    """The bytes of a sample's image member (the first of ``SHARD_IMAGE_MEMBERS`` it has), or None."""
    for member in SHARD_IMAGE_MEMBERS:
        if member in sample:
            return sample[member]
    return None


@dataclass
class ShardSample:
    """One item of a shard's sample stage: a sample and its row key, or (``sample`` None) an error row."""

    key: str
    sample: dict[str, Any] | None
    error: str | None
    number: int
    """The sample's position in the shard, from 1 (the error row of a broken shard: one past the last)."""


def shard_samples(url: str, skip_keys: Iterable[str] = ()) -> Iterator[ShardSample]:
    """The samples of one shard in order, keys in ``skip_keys`` left out, ending with its error row if it broke.

    A later group of members with an earlier sample's key is recorded as ``key (repeat N)``, not merged."""
    skip = skip_keys if isinstance(skip_keys, (set, frozenset)) else frozenset(skip_keys)
    name = printable(shard_name(url))
    count = 0
    try:
        seen: dict[str, int] = {}
        for sample in iter_shard_samples(url):
            count += 1
            key = printable(f"{name}/{sample['__key__']}")
            repeats = seen[key] = seen.get(key, 0) + 1
            if repeats > 1:
                key = f"{key} (repeat {repeats})"
                if key not in skip:
                    yield ShardSample(key, None, REPEATED_KEY, count)
                continue
            if key not in skip:
                yield ShardSample(key, sample, None, count)
    except Exception as exc:  # tar, pipe and network errors: one row for the shard, then the next shard
        key = f"{name}/"
        if key not in skip:
            where = f" after {count} sample(s)" if count else ""
            yield ShardSample(key, None, f"cannot read shard{where}: {shard_error(exc)}", count + 1)


def missing_image(sample: Mapping[str, Any]) -> str:
    """Why a sample without an image member has none: what it holds, or that its image member is a link."""
    members = ", ".join(sorted(k for k in sample if k not in ("__key__", LINK_MEMBERS)))
    linked = ", ".join(m for m in sample.get(LINK_MEMBERS, []) if m in SHARD_IMAGE_MEMBERS)
    reason = (f"image member is a link ({linked}); links in shards are not followed" if linked
              else f"no image in sample (members: {members})")
    return printable(reason)


class ShardDataset(IterableDataset):
    """Iterable dataset over WebDataset shards, split by rank and by DataLoader worker.

    Rank ``r`` of ``world_size`` reads ``shards[r::world_size]``; within it, worker ``w`` of ``n``
    reads every ``n``-th of those. A shard that cannot be opened or breaks mid-way yields one
    error row keyed ``shardname/``; samples without an image yield an error row of their own.
    """

    def __init__(
        self,
        shards: Sequence[str],
        transform: Transform,
        *,
        rank: int = 0,
        world_size: int = 1,
        skip_keys: Iterable[str] = (),
        max_pixels: int | None = PIL_LIMIT,
        draft_size: int | None = None,
        columns: Sequence[ShardColumn] = (),
    ) -> None:
        check_rank(rank, world_size)
        self.columns = list(columns)
        """Carried members, JSON fields or the sample key (:mod:`ramtag.data.shard_columns`)."""
        self.shards = list(shards)
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.skip_keys = frozenset(skip_keys)
        self.max_pixels = max_pixels
        self.draft_size = draft_size

    def assigned_shards(self) -> list[str]:
        """The shards this rank and (inside a DataLoader worker) this worker read."""
        return split_by_node_and_worker(self.shards, self.rank, self.world_size)

    def __iter__(self) -> Iterator[Record]:
        for url in self.assigned_shards():
            yield from self.read_shard(url)

    def read_shard(self, url: str) -> Iterator[Record]:
        """The records of one shard (samples in ``skip_keys`` left out), ending with its error row if it broke."""
        source = printable(url)
        for item in shard_samples(url, self.skip_keys):
            if item.sample is None:
                yield Record(item.key, source, None, item.error)
                continue
            extra = sample_values(item.sample, self.columns)
            data = sample_image(item.sample)
            if data is None:
                yield Record(item.key, source, None, missing_image(item.sample), extra)
                continue
            image, error = decode(data, self.transform, self.max_pixels, self.draft_size)
            yield Record(item.key, source, image, error, extra)
