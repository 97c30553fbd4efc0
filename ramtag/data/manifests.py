"""Manifests (``.parquet``, ``.csv``, ``.jsonl``): checked by their schema first, then read record batch by record
batch, each batch turned into listing rows by ``pyarrow.compute``, so that a manifest of any length is never
held whole (ten million rows cost one batch of memory, not gigabytes of Python strings).

A row's key is its path as written; its path and source are that path opened relative to ``base`` (``--root``,
else the manifest's own folder). A blank path becomes an error row keyed ``MANIFEST:ROW``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ramtag.data import storage
from ramtag.data.image_tables import RENAMED_COLUMNS, check_path_column, image_columns_hint, output_column
from ramtag.data.listing import BASE_COLUMNS, Listing, Warn, printable
from ramtag.errors import DataError, UsageError
from ramtag.messages import first_line

MANIFEST_BATCH_ROWS = 65_536

_RESERVED = {"key", "source", "tags", "error", "scores"} - set(RENAMED_COLUMNS)
_URL = r"^[A-Za-z][A-Za-z0-9+.-]*://"  # storage.scheme's pattern: a URL is never relative
_NOT_NORMAL = r"(^|/)\.(/|$)|//|/$|^$"  # what pathlib would rewrite when joining: left to pathlib


@dataclass(frozen=True)
class Manifest:
    """A manifest whose columns have been checked: what to read, and the carried columns it gives."""

    path: str
    path_column: str
    keep_columns: tuple[str, ...]
    base: Path | None
    beside: bool
    """``base`` is the manifest's own folder (no ``--root``): worth a hint when its paths look cwd-relative."""
    extra_schema: pa.Schema

    @property
    def columns(self) -> list[str]:
        return [self.path_column] + [name for name in self.keep_columns if name != self.path_column]


def check_keep_columns(keep_columns: Sequence[str]) -> None:
    clashes = sorted(_RESERVED.intersection(keep_columns))
    if clashes:
        raise DataError(f"--keep-columns {', '.join(clashes)}: these names are output columns of ramtag")
    renamed = sorted(name for name in keep_columns if output_column(name) in keep_columns and name in RENAMED_COLUMNS)
    if renamed:
        raise UsageError(f"--keep-columns {renamed[0]} is written as {output_column(renamed[0])}, which is kept too")


def open_manifest(manifest: str, path_column: str, keep_columns: Sequence[str], base: Path | None) -> Manifest:
    """Check that ``manifest`` exists and has the columns asked for (a footer or a first block is read)."""
    if storage.is_remote(manifest):
        if storage.file_type(manifest) != "file":
            storage.check_bucket(manifest, DataError)
            raise DataError(f"{manifest}: no such manifest")
    elif not os.path.isfile(manifest):
        raise DataError(f"{manifest}: no such manifest")
    check_keep_columns(keep_columns)
    beside = base is None and "://" not in manifest  # (a URL's folder is not a Path)
    described = Manifest(manifest, path_column, tuple(keep_columns), Path(manifest).parent if beside else base,
                         beside, pa.schema([]))
    try:
        schema = _schema(manifest)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{manifest}: cannot read manifest ({first_line(exc)})") from exc
    missing = [name for name in described.columns if name not in schema.names]
    if missing:
        hint = image_columns_hint(schema) if manifest.lower().endswith(".parquet") else ""
        raise DataError(f"{manifest}: no column(s) {', '.join(missing)} (columns: {', '.join(schema.names)}){hint}")
    check_path_column(manifest, path_column, schema.field(path_column).type)
    extra = pa.schema([pa.field(output_column(name), schema.field(name).type) for name in keep_columns])
    return Manifest(described.path, path_column, tuple(keep_columns), described.base, beside, extra)


def _source(path: str) -> Any:
    return storage.open_random_access(path) if storage.is_remote(path) else path


def _schema(path: str) -> pa.Schema:
    lowered = path.lower()
    if lowered.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_schema(_source(path))
    return _text_reader(path).schema  # (reads the first block, from which the types are inferred)


def _text_reader(path: str, path_column: str | None = None) -> Any:
    if path.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        # Paths stay strings even when they look like numbers (e.g. 0001).
        types = {path_column: pa.string()} if path_column else {}
        return pacsv.open_csv(
            _source(path), convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)
        )
    import pyarrow.json as pajson

    return pajson.open_json(_source(path))


def manifest_batches(manifest: Manifest) -> Iterator[pa.RecordBatch]:
    """The manifest's path and carried columns, a record batch at a time; read errors are one DataError."""
    columns = manifest.columns
    try:
        if manifest.path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            batches = _row_group_batches(pq.ParquetFile(_source(manifest.path)), columns)
        else:
            batches = _text_reader(manifest.path, manifest.path_column)
        for batch in batches:
            yield pa.record_batch([batch.column(name) for name in columns], names=columns)
    except (DataError, UsageError):
        raise
    except Exception as exc:
        raise DataError(f"{manifest.path}: cannot read manifest ({first_line(exc)})") from exc


def add_manifest(collector: Listing, manifest: Manifest, warn: Warn | None = None) -> None:
    """Every row of ``manifest`` into the listing, a batch at a time."""
    row = 1
    hinted = not (manifest.beside and warn is not None)
    for batch in manifest_batches(manifest):
        if not hinted:
            first = first_relative_path(batch, manifest.path_column)
            if first is not None:
                hinted = True
                _warn_when_paths_look_cwd_relative(manifest, first, warn)
        collector.add_batch(listing_batch(manifest, batch, row, collector.schema))
        row += batch.num_rows


def _warn_when_paths_look_cwd_relative(manifest: Manifest, first: str, warn: Warn) -> None:
    """One stat, not one per row: the first relative path missing beside the manifest but present from the
    current directory means the manifest was written for the old rule; say how to get it."""
    if os.path.exists(manifest.base / first) or not os.path.exists(first):
        return
    warn(
        f"{manifest.path}: relative paths are read from the manifest's folder ({manifest.base}), where {first} is "
        "missing; it exists from the current directory: pass --root . to read them from there"
    )


def _row_group_batches(manifest: Any, columns: list[str]) -> Iterator[pa.RecordBatch]:
    # A row group at a time: over the whole file, iter_batches reads ahead and buffers later row groups,
    # which made planning grow by ~4 bytes a row (benchmarks/README.md section 7).
    for group in range(manifest.num_row_groups):
        yield from manifest.iter_batches(MANIFEST_BATCH_ROWS, row_groups=[group], columns=columns)


def listing_batch(manifest: Manifest, batch: pa.RecordBatch, first_row: int, schema: pa.Schema) -> pa.RecordBatch:
    """Rows of the listing (``schema``: key, source, path, error, then the carried columns) for ``batch``, whose
    first row is row ``first_row`` (from 1) of the manifest."""
    paths = batch.column(manifest.path_column).cast(pa.string())
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(paths), ""), True)
    blank_rows = [first_row + index for index in pc.indices_nonzero(blank).to_pylist()]
    name = printable(manifest.path)
    resolved = resolved_paths(paths, manifest.base)
    keys, sources, stored = paths, resolved, resolved
    errors = pa.nulls(len(batch), pa.string())
    if blank_rows:
        keys = pc.replace_with_mask(paths, blank, pa.array([f"{name}:{row}" for row in blank_rows], pa.string()))
        sources = pc.replace_with_mask(resolved, blank, pa.array([name] * len(blank_rows), pa.string()))
        stored = pc.if_else(blank, pa.scalar(None, pa.string()), resolved)
        messages = [f"empty path in manifest row {row}" for row in blank_rows]
        errors = pc.replace_with_mask(errors, blank, pa.array(messages, pa.string()))
    columns: list[pa.Array] = [keys, sources, stored, errors]
    carried = {output_column(name): batch.column(name) for name in manifest.keep_columns}
    for carried_field in schema:
        if carried_field.name in BASE_COLUMNS:
            continue
        column = carried.get(carried_field.name)
        if column is None:  # a column that only tables or shards carry
            columns.append(pa.nulls(len(batch), carried_field.type))
            continue
        try:
            columns.append(column.cast(carried_field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(
                f"{manifest.path}: --keep-columns types differ from an earlier manifest ({first_line(exc)})"
            ) from exc
    return pa.record_batch(columns, schema=schema)


def resolved_paths(paths: pa.Array, base: Path | None) -> pa.Array:
    """``str(base / path)`` for each relative path, the path itself for absolute ones and URLs; vectorised,
    with pathlib itself for the few paths it would rewrite (``./``, ``//``, a trailing slash)."""
    if base is None or len(paths) == 0:
        return paths
    absolute = pc.or_(pc.starts_with(paths, "/"), pc.match_substring_regex(paths, _URL))
    relative = pc.fill_null(pc.invert(absolute), False)
    top = str(base)
    prefix = "" if top == "." else top if top.endswith("/") else top + "/"
    joined = pc.if_else(relative, pc.binary_join_element_wise(prefix, paths, ""), paths)
    odd = pc.fill_null(pc.and_(relative, pc.match_substring_regex(paths, _NOT_NORMAL)), False)
    odd_rows = pc.indices_nonzero(odd).to_pylist()
    if not odd_rows:
        return joined
    by_pathlib = [str(base / paths[row].as_py()) for row in odd_rows]
    return pc.replace_with_mask(joined, odd, pa.array(by_pathlib, pa.string()))


def first_relative_path(batch: pa.RecordBatch, path_column: str) -> str | None:
    """The first non-blank relative path of ``batch``, or None."""
    paths = batch.column(path_column).cast(pa.string())
    wanted = pc.and_(pc.invert(pc.equal(pc.utf8_trim_whitespace(paths), "")), pc.invert(pc.starts_with(paths, "/")))
    rows = pc.indices_nonzero(pc.fill_null(wanted, False))
    return paths[rows[0].as_py()].as_py() if len(rows) else None
