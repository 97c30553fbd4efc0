"""Part files of work units, and the commit of a unit to the ledger.

Rows of unit ``u`` go to ``part-u{u}-r{run}-c{chunk}.parquet`` in the work directory: written under a
temporary name, fsynced, renamed. A chunk is closed at ``part_rows`` rows or when its oldest row is
``part_seconds`` old, so a kill loses at most that much of a unit in flight. Only when the unit ended
and all its parts are renamed does its line go to the ledger (:mod:`ramtag.data.ledger`); a unit in
flight at a kill keeps its committed parts, and the next run redoes only the rest of it.

Writing happens in a background thread; :meth:`UnitPartWriter.write` and :meth:`commit` only enqueue,
in order, so a unit is committed after its rows are written. Without a work directory (``-o -``) rows
go to stdout as JSON lines and commits do nothing.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from ramtag.data.ledger import LedgerEntry, LedgerWriter, part_name
from ramtag.data.rows import TagBatch, batch_to_arrow, rows_to_jsonl
from ramtag.data.units import UnitEnd
from ramtag.errors import STORAGE_FULL_ERRNOS, OutputError, ReaderGone, StorageFull


@dataclass
class _OpenUnit:
    unit: int
    parts: list[str] = field(default_factory=list)
    rows: int = 0
    errors: int = 0
    chunk: int = 0
    pending: list[pa.RecordBatch] = field(default_factory=list)
    pending_rows: int = 0
    writer: pq.ParquetWriter | None = None
    part_rows: int = 0
    unsaved_since: float | None = None
    current: str = ""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UnitPartWriter:
    """Writes the rows of this rank's units to part files and commits each finished unit to the ledger."""

    def __init__(
        self,
        work_dir: Path | None,
        schema: pa.Schema,
        labels: Sequence[str],
        *,
        run: int = 0,
        rank: int = 0,
        part_rows: int = 262_144,
        row_group_rows: int = 16_384,
        part_seconds: float = 60.0,
        queue_batches: int = 64,
        stdout: TextIO | None = None,
        publish: Any = None,
    ) -> None:
        self.work_dir = work_dir
        self.publish = publish
        """Object storage (:class:`ramtag.data.remote_output.RemoteWork`): gets each committed part and unit."""
        self.schema = schema
        self.labels = pa.array(list(labels), pa.string())
        self.run = run
        self.rank = rank
        self.row_group_rows = max(1, row_group_rows)
        self.part_rows = max(self.row_group_rows, part_rows)
        self.part_seconds = part_seconds
        self.stdout = stdout
        self.rows_written = 0
        self.units_committed = 0
        self._ledger = LedgerWriter(work_dir, run, rank) if work_dir is not None else None
        self._units: dict[int, _OpenUnit] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_batches))
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"ramtag-parts-{rank}", daemon=True)
        self._thread.start()

    # -- caller side -----------------------------------------------------------------------

    def write(self, batch: TagBatch, units: Sequence[int]) -> None:
        """Queue rows; ``units[i]`` is the unit of row ``i`` (do not change the batch's arrays afterwards)."""
        if len(batch) == 0:
            return
        if len(units) != len(batch):
            raise ValueError(f"{len(units)} unit ids for {len(batch)} rows")
        self._put(("rows", batch, list(units)))

    def commit(self, end: UnitEnd) -> None:
        """Queue the commit of a unit whose rows were all written."""
        self._put(("commit", end, None))

    def close(self) -> None:
        """Write what is queued and close open parts (their units stay uncommitted: the next run redoes the rest)."""
        if self._closed:
            self._raise_if_failed()
            return
        self._closed = True
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        if self._ledger is not None:
            self._ledger.close()
        self._raise_if_failed()

    def _put(self, item: Any) -> None:
        if self._closed:
            raise OutputError("write after close")
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            if isinstance(error, OutputError):
                raise error
            if isinstance(error, OSError) and error.errno in STORAGE_FULL_ERRNOS:
                raise StorageFull.from_os_error(error) from error
            raise OutputError(f"writing the output failed: {error}") from error

    # -- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=max(0.05, min(1.0, self.part_seconds / 4)))
                except queue.Empty:
                    self._save_old_parts()
                    continue
                if item is None:
                    break
                kind, payload, units = item
                if kind == "rows":
                    self._accept(payload, units)
                else:
                    self._commit(payload)
                self._save_old_parts()
            for state in self._units.values():
                self._flush(state)
                self._close_part(state)
        except BaseException as exc:  # reported to the caller on its next call
            self._error = exc
            self._discard_parts()

    def _accept(self, batch: TagBatch, units: list[int]) -> None:
        record_batch = batch_to_arrow(batch, self.labels, self.schema)
        if self.work_dir is None:
            self._emit_stdout(record_batch)
            return
        errors = [error is not None for error in batch.errors]
        start = 0
        while start < len(units):  # rows come in runs of one unit (a worker reads a unit at a time)
            stop = start + 1
            while stop < len(units) and units[stop] == units[start]:
                stop += 1
            self._add(units[start], record_batch.slice(start, stop - start), sum(errors[start:stop]))
            start = stop

    def _add(self, unit: int, rows: pa.RecordBatch, errors: int) -> None:
        state = self._units.setdefault(unit, _OpenUnit(unit))
        state.pending.append(rows)
        state.pending_rows += rows.num_rows
        state.rows += rows.num_rows
        state.errors += errors
        if state.unsaved_since is None:
            state.unsaved_since = time.monotonic()
        if state.pending_rows >= self.row_group_rows:
            self._flush(state)
        if state.part_rows >= self.part_rows:
            self._close_part(state)

    def _commit(self, end: UnitEnd) -> None:
        state = self._units.pop(end.unit, None) or _OpenUnit(end.unit)
        if self.work_dir is None:
            return
        self._flush(state)
        self._close_part(state)
        assert self._ledger is not None
        entry = LedgerEntry(
            unit=end.unit,
            run=self.run,
            rank=self.rank,
            parts=list(end.kept_parts) + state.parts,
            rows=end.kept_rows + state.rows,
            errors=end.kept_errors + state.errors,
            unit_error=end.unit_error,
            drop=end.drop,
        )
        self._ledger.append(entry)
        if self.publish is not None:  # after its parts: the bucket's ledger entry commits the unit there
            self.publish.unit(entry)
        self.units_committed += 1

    def _save_old_parts(self) -> None:
        """Bound the work a kill can lose: rows older than ``part_seconds`` go into a committed part."""
        now = time.monotonic()
        for state in self._units.values():
            if state.unsaved_since is not None and now - state.unsaved_since >= self.part_seconds:
                self._flush(state)
                self._close_part(state)

    def _emit_stdout(self, record_batch: pa.RecordBatch) -> None:
        stream = self.stdout if self.stdout is not None else sys.stdout
        try:
            stream.write(rows_to_jsonl(record_batch))
            stream.flush()
        except BrokenPipeError as exc:  # `| head`: an intended early stop, which the CLI ends quietly
            raise ReaderGone("stdout was closed by the reader") from exc
        self.rows_written += record_batch.num_rows

    def _flush(self, state: _OpenUnit) -> None:
        if not state.pending:
            return
        table = pa.Table.from_batches(state.pending, schema=self.schema)
        state.pending, state.pending_rows = [], 0
        if state.writer is None:
            self._open_part(state)
        assert state.writer is not None
        state.writer.write_table(table, row_group_size=self.row_group_rows)
        state.part_rows += table.num_rows
        self.rows_written += table.num_rows

    def _open_part(self, state: _OpenUnit) -> None:
        assert self.work_dir is not None
        state.current = part_name(state.unit, self.run, state.chunk)
        state.writer = pq.ParquetWriter(self.work_dir / f".tmp-{state.current}", self.schema)
        state.part_rows = 0

    def _close_part(self, state: _OpenUnit) -> None:
        if state.writer is None:
            return
        assert self.work_dir is not None
        state.writer.close()
        name = state.current
        temporary = self.work_dir / f".tmp-{name}"
        _fsync(temporary)
        os.replace(temporary, self.work_dir / name)
        if self.publish is not None:
            self.publish.part(self.work_dir / name)
        state.writer = None
        state.unsaved_since = None
        state.parts.append(name)
        state.chunk += 1

    def _discard_parts(self) -> None:
        for state in self._units.values():
            if state.writer is None:
                continue
            try:
                state.writer.close()
                assert self.work_dir is not None
                (self.work_dir / f".tmp-{state.current}").unlink(missing_ok=True)
            except Exception:
                pass
            state.writer = None
