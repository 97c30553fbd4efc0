"""The listing spilled once to the output's work folder (``listing.arrow``: Arrow IPC, one record batch per unit),
written as it is listed, and the check for repeated keys that runs alongside.

Neither holds the listing: the writer keeps at most one unit of rows, the repeat check sends 8 bytes a row (a
hash of the key) to bucket files on disk and reads back one bucket at a time. Only keys whose hash repeats are
looked at again, in a second pass, so the usual run (no repeats) reads its listing once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ramtag.atomic import atomic_path
from ramtag.errors import DataError

LISTING_FILE = "listing.arrow"
"""An Arrow IPC file, not Parquet: a reader opens one unit's batch through a footer of 24 bytes a unit, where a
Parquet footer of one row group per unit costs every process that opens it ~4 KB of memory a unit (400 MB at
100,000 units, in each DataLoader worker; benchmarks/scale.py)."""
LISTING_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


class ListingWriter:
    """Writes record batches of exactly ``batch_rows`` rows (the last one shorter) to an Arrow IPC file, whatever
    the sizes it is given; ``sizes`` lists the rows of each written batch (one per unit)."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int):
        self.sizes: list[int] = []
        self._schema = schema
        self._batch_rows = batch_rows
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._writer = pa.ipc.new_file(str(path), schema, options=LISTING_OPTIONS)

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= self._batch_rows:
            table = pa.Table.from_batches(self._pending, self._schema)
            start = 0
            while table.num_rows - start >= self._batch_rows:
                self._write(table.slice(start, self._batch_rows))
                start += self._batch_rows
            rest = table.slice(start)
            self._pending = [self._batch(rest)] if rest.num_rows else []
            self._pending_rows = rest.num_rows

    def close(self) -> None:
        if self._pending_rows:
            self._write(pa.Table.from_batches(self._pending, self._schema))
        self._pending, self._pending_rows = [], 0
        self._writer.close()

    def _batch(self, piece: pa.Table) -> pa.RecordBatch:
        return pa.record_batch([column.combine_chunks() for column in piece.columns], schema=self._schema)

    def _write(self, piece: pa.Table) -> None:
        self._writer.write_batch(self._batch(piece))
        self.sizes.append(piece.num_rows)


def open_listing(listing: Path) -> pa.ipc.RecordBatchFileReader:
    """The listing, memory-mapped: batch ``unit.group`` holds that unit's rows."""
    return pa.ipc.open_file(pa.memory_map(str(listing)))


def listing_batches(listing: Path) -> Iterator[pa.RecordBatch]:
    reader = open_listing(listing)
    for index in range(reader.num_record_batches):
        yield reader.get_batch(index)


def rewrite_listing(
    source: Path, target: Path, batch_rows: int,
    keep: Callable[[Iterable[pa.RecordBatch]], Iterator[pa.RecordBatch]] = iter,
) -> list[int]:
    """Copy ``source`` to ``target`` (atomically) in batches of ``batch_rows``, through ``keep``; the rows of each
    batch written."""
    schema = open_listing(source).schema
    with atomic_path(target) as temporary:
        writer = ListingWriter(temporary, schema, batch_rows)
        try:
            for batch in keep(listing_batches(source)):
                writer.write(batch)
        finally:
            writer.close()
    return writer.sizes


def _hashes(keys: pa.Array) -> pa.Array:
    # Python's string hash: 64 bits, the same for equal strings within this process, which is all the
    # check needs (the hashes never leave it).
    return pa.array([hash(key) for key in keys.to_pylist()], pa.int64())


class RepeatedKeys:
    """The hashes of every key added, bucketed to files in ``directory`` (a temporary folder of its own below it,
    removed on close); :meth:`suspects` reads one bucket at a time and returns the hashes seen twice."""

    BUCKETS = 64

    def __init__(self, directory: Path | None = None):
        self._folder = Path(tempfile.mkdtemp(prefix=".repeats-", dir=directory))
        self._files = [open(self._folder / f"{bucket:02d}", "wb") for bucket in range(self.BUCKETS)]

    def add(self, keys: pa.Array) -> None:
        hashes = _hashes(keys)
        buckets = pc.bit_wise_and(hashes, self.BUCKETS - 1)
        for bucket in pc.unique(buckets).to_pylist():
            chosen = hashes.filter(pc.equal(buckets, bucket))
            self._files[bucket].write(memoryview(chosen.buffers()[1])[: len(chosen) * 8])

    def suspects(self) -> set[int]:
        found: set[int] = set()
        for handle in self._files:
            handle.close()
            data = pa.py_buffer(Path(handle.name).read_bytes())
            hashes = pa.Array.from_buffers(pa.int64(), len(data) // 8, [None, data])
            if len(hashes) < 2:
                continue
            ordered = pc.take(hashes, pc.sort_indices(hashes))
            twice = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
            found.update(ordered.slice(1).filter(twice).to_pylist())
        return found

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> RepeatedKeys:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RepeatFilter:
    """Drops exact repeats (same key, same path) of rows whose key hash is a suspect, keeping the first; refuses
    one key for two files. Holds the suspects' first paths only."""

    def __init__(self, suspects: set[int]):
        self.dropped = 0
        self._suspects = pa.array(sorted(suspects), pa.int64())
        self._first_path: dict[str, str | None] = {}

    def __call__(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            hashes = _hashes(batch.column(0))
            rows = pc.indices_nonzero(pc.is_in(hashes, value_set=self._suspects)).to_pylist()
            if not rows:
                yield batch
                continue
            keep = [True] * batch.num_rows
            keys, paths = batch.column(0), batch.column(2)
            for row in rows:
                key, path = keys[row].as_py(), paths[row].as_py()
                if key not in self._first_path:
                    self._first_path[key] = path
                elif self._first_path[key] == path:
                    keep[row] = False
                    self.dropped += 1
                else:
                    raise DataError(
                        f"key {key!r} would name two different files ({self._first_path[key]} and {path}); "
                        "pass their common parent folder instead, or tag them in separate runs"
                    )
            yield batch.filter(pa.array(keep))


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
