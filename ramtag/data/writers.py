"""Tag tables: Parquet, JSONL, JSONL on stdout, or a partitioned Parquet dataset.

This module writes the rows of a plain run: :class:`TagTableWriter` turns batches into Arrow in a
background thread and writes *part files* into the output's work directory (see
:mod:`ramtag.data.layout`); each is a complete Parquet file, written under a temporary name and
renamed when closed, so a killed run leaves only whole parts (at most ``part_seconds`` of work is
lost). :func:`finalize_output` (:mod:`ramtag.data.assemble`) merges them, keeping one row per key.
Runs of work units write through :mod:`ramtag.data.parts` and a ledger instead.

The names of the modules split out of this one are re-exported here.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from ramtag.atomic import write_json
from ramtag.data.assemble import count_rows, finalize_output
from ramtag.data.layout import (
    OutputKind,
    OutputLayout,
    attach_output,
    iter_jsonl_rows,
    output_kind,
    prepare_output,
    read_table_metadata,
)
from ramtag.data.rows import TagBatch, batch_to_arrow, rows_to_jsonl, schema_with_metadata, table_schema
from ramtag.errors import OutputError, ReaderGone


class TagTableWriter:
    """Write tag rows from a background thread; :meth:`write` only enqueues.

    With a layout (files), rows go to part files of this rank; with ``layout=None``, JSON lines
    go to ``stdout`` as they come. Call :meth:`close` when done (also after an interruption:
    it keeps every row written so far).
    """

    def __init__(
        self,
        layout: OutputLayout | None,
        labels: Sequence[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        all_scores: bool = False,
        extra_schema: pa.Schema | None = None,
        rank: int = 0,
        row_group_rows: int = 16_384,
        rows_per_part: int = 262_144,
        part_seconds: float = 60.0,
        queue_batches: int = 64,
        stdout: TextIO | None = None,
    ) -> None:
        self.layout = layout
        self.labels = pa.array(list(labels), pa.string())
        self.metadata = dict(metadata or {})
        self.schema = schema_with_metadata(table_schema(extra_schema, all_scores), self.metadata)
        self._extra_schema = extra_schema
        self.rank = rank
        self.row_group_rows = max(1, row_group_rows)
        self.rows_per_part = max(self.row_group_rows, rows_per_part)
        self.part_seconds = part_seconds
        self.stdout = stdout
        self.rows_written = 0
        self.parts_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_batches))
        self._error: BaseException | None = None
        self._closed = False
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._part: pq.ParquetWriter | None = None
        self._part_path: Path | None = None
        self._part_rows = 0
        self._unsaved_since: float | None = None
        self._chunk = 0
        if layout is not None:
            self._remove_stale_temporaries()
        self._thread = threading.Thread(target=self._run, name=f"ramtag-writer-{rank}", daemon=True)
        self._thread.start()

    # -- caller side -----------------------------------------------------------------------

    def write(self, batch: TagBatch) -> None:
        """Queue rows for writing (the batch is read later: do not change its arrays afterwards).

        Raises :class:`OutputError` if the writer thread failed.
        """
        if self._closed:
            raise OutputError("write after close")
        if len(batch) == 0:
            return
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued, finish the open part, record this rank as done."""
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
        self._raise_if_failed()
        if self.layout is not None:
            marker = self.layout.work_dir / f"done-{self.layout.run}-r{self.rank}.json"
            write_json(marker, {"rows": self.rows_written, "parts": self.parts_written})

    def finalize(self, world_size: int = 1) -> Path | None:
        """Rank 0, after every rank closed (a barrier): assemble the final output."""
        self.close()
        if self.rank != 0:
            raise OutputError("only rank 0 assembles the output")
        return finalize_output(
            self.layout,
            world_size=world_size,
            metadata=self.metadata,
            all_scores="scores" in self.schema.names,
            extra_schema=self._extra_schema,
        )

    def __enter__(self) -> TagTableWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            if isinstance(error, OutputError):
                raise error
            raise OutputError(f"writing the output failed: {error}") from error

    # -- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=max(0.05, min(1.0, self.part_seconds / 4)))
                except queue.Empty:
                    self._save_if_old()
                    continue
                if item is None:
                    break
                self._accept(batch_to_arrow(item, self.labels, self.schema))
            self._flush()
            self._close_part()
        except BaseException as exc:  # reported to the caller on its next call
            self._error = exc
            self._discard_part()

    def _accept(self, record_batch: pa.RecordBatch) -> None:
        if self.layout is None:
            self._emit_stdout(record_batch)
            return
        self._pending.append(record_batch)
        self._pending_rows += record_batch.num_rows
        if self._unsaved_since is None:
            self._unsaved_since = time.monotonic()
        if self._pending_rows >= self.row_group_rows:
            self._flush()
        if self._part_rows >= self.rows_per_part:
            self._close_part()
        self._save_if_old()

    def _save_if_old(self) -> None:
        """Bound the work a kill can lose: rows older than ``part_seconds`` go into a finished part."""
        if self._unsaved_since is not None and time.monotonic() - self._unsaved_since >= self.part_seconds:
            self._flush()
            self._close_part()

    def _emit_stdout(self, record_batch: pa.RecordBatch) -> None:
        stream = self.stdout if self.stdout is not None else sys.stdout
        try:
            stream.write(rows_to_jsonl(record_batch))
            stream.flush()
        except BrokenPipeError as exc:  # `| head`: an intended early stop, which the CLI ends quietly
            raise ReaderGone("stdout was closed by the reader") from exc
        self.rows_written += record_batch.num_rows

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        self._pending, self._pending_rows = [], 0
        if self._part is None:
            self._open_part()
        assert self._part is not None
        self._part.write_table(table, row_group_size=self.row_group_rows)
        self._part_rows += table.num_rows
        self.rows_written += table.num_rows

    def _open_part(self) -> None:
        assert self.layout is not None
        name = f"part-{self.layout.run:06d}-r{self.rank:05d}-c{self._chunk:06d}.parquet"
        self._part_path = self.layout.work_dir / name
        temporary = self.layout.work_dir / f".tmp-r{self.rank}-{name}"
        self._part = pq.ParquetWriter(temporary, self.schema)
        self._part_rows = 0

    def _temporary(self) -> Path:
        assert self.layout is not None and self._part_path is not None
        return self.layout.work_dir / f".tmp-r{self.rank}-{self._part_path.name}"

    def _close_part(self) -> None:
        if self._part is None:
            return
        self._part.close()
        os.replace(self._temporary(), self._part_path)
        self._part = None
        self._unsaved_since = None
        self._chunk += 1
        self.parts_written += 1

    def _discard_part(self) -> None:
        if self._part is None:
            return
        try:
            self._part.close()
            self._temporary().unlink(missing_ok=True)
        except Exception:
            pass
        self._part = None

    def _remove_stale_temporaries(self) -> None:
        assert self.layout is not None
        for path in self.layout.work_dir.glob(f".tmp-r{self.rank}-part-*"):
            path.unlink(missing_ok=True)


__all__ = [
    "OutputKind",
    "OutputLayout",
    "TagBatch",
    "TagTableWriter",
    "attach_output",
    "batch_to_arrow",
    "count_rows",
    "finalize_output",
    "iter_jsonl_rows",
    "output_kind",
    "prepare_output",
    "read_table_metadata",
    "rows_to_jsonl",
    "table_schema",
]
