"""Final assembly of a plain run's parts: one row per key (a good row over an error row, else the newest).

Row order in the final table follows the parts (run, rank, chunk); sort by ``key`` for a canonical order.

Beside every output goes its vocabulary, ``OUT.labels.txt`` (``tags.parquet.labels.txt``; ``out.labels.txt``
for a dataset folder ``out/``, outside it: polars refuses a folder that mixes file extensions): one label per
line in the order of the ``scores`` column, readable back as ``--labels``. It outlives the Parquet schema
metadata, which pandas, polars and DuckDB drop when they rewrite a table. It is written atomically before the
table, so a finished table always has it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ramtag.atomic import atomic_path, write_json, write_text
from ramtag.data.layout import (
    SUCCESS_FILE,
    OutputLayout,
    _dataset_files,
    _read_key_tables,
    _read_run_file,
    _unlock_output,
)
from ramtag.data.ledger import LedgerEntry
from ramtag.data.rows import METADATA_KEY, rows_to_jsonl, schema_with_metadata, table_schema
from ramtag.errors import OutputError

LABEL_FILE_SUFFIX = ".labels.txt"

# ---------------------------------------------------------------------------------------------
# The vocabulary beside the table


def label_file_path(output: str | os.PathLike) -> Path:
    """Where the vocabulary of ``output`` goes: ``OUT.labels.txt`` beside it (a dataset folder's beside the folder)."""
    path = Path(output)  # Path("out/") is "out"
    if path.name in ("", "..", "."):  # -o ./ names the folder by its full path
        path = Path(os.path.abspath(path))
    return path.with_name(path.name + LABEL_FILE_SUFFIX)


def write_label_file(path: str | os.PathLike, labels: Sequence[str]) -> None:
    """One label per line (labels hold no line breaks: they are lines of a label file), atomically."""
    write_text(path, "".join(f"{label}\n" for label in labels))


def _write_labels_of(output: Path, schema: pa.Schema) -> None:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    labels = json.loads(raw).get("vocabulary") if raw else None
    if labels is not None:
        write_label_file(label_file_path(output), labels)


# ---------------------------------------------------------------------------------------------
# Final assembly


def _winner_masks(sources: Sequence[Path]) -> list[np.ndarray | None]:
    """Per source, which rows to keep (None: all): one row per key, good rows over errors, newest last."""
    tables = _read_key_tables(sources)
    sizes = [table.num_rows for table in tables]
    if not tables:
        return []
    keys = (
        pa.concat_arrays([table["key"].combine_chunks() for table in tables])
        if sum(sizes)
        else pa.array([], pa.string())
    )
    if pc.count_distinct(keys).as_py() == len(keys):
        return [None] * len(tables)
    ok = pa.concat_arrays([pc.is_null(table["error"]).combine_chunks() for table in tables])
    order = pa.table({"key": keys, "ok": ok, "index": pa.array(np.arange(len(keys)), pa.int64())}).sort_by(
        [("key", "ascending"), ("ok", "descending"), ("index", "descending")]
    )
    sorted_keys = order["key"].combine_chunks()
    first = np.ones(len(keys), dtype=bool)
    if len(keys) > 1:
        first[1:] = pc.not_equal(sorted_keys.slice(1), sorted_keys.slice(0, len(keys) - 1)).to_numpy(
            zero_copy_only=False
        )
    keep = np.zeros(len(keys), dtype=bool)
    keep[order["index"].to_numpy()[first]] = True
    masks: list[np.ndarray | None] = []
    start = 0
    for size in sizes:
        part = keep[start : start + size]
        masks.append(None if part.all() else part)
        start += size
    return masks


def _read_source(path: Path, schema: pa.Schema) -> pa.Table:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _read_jsonl_table(path, schema)
    table = pq.read_table(path)
    try:
        return table.select(schema.names).cast(schema.remove_metadata()).replace_schema_metadata(schema.metadata)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise OutputError(f"{path}: its columns differ from this run's; pass --overwrite to start over") from exc


def _read_jsonl_table(path: Path, schema: pa.Schema) -> pa.Table:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
    bare = schema.remove_metadata()
    try:
        return pa.Table.from_pylist(rows, schema=bare).replace_schema_metadata(schema.metadata)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise OutputError(f"{path}: its rows do not fit this run's columns; pass --overwrite to start over") from exc


def finalize_output(
    layout: OutputLayout | None,
    *,
    world_size: int = 1,
    metadata: Mapping[str, Any] | None = None,
    all_scores: bool = False,
    extra_schema: pa.Schema | None = None,
    row_group_rows: int = 65_536,
) -> Path | None:
    """Merge earlier output and every part into the final output, atomically (rank 0 only).

    Call after every rank closed its writer (a barrier). Refuses, keeping every part so that
    ``--resume`` can continue, when a rank of this run did not close its writer. The run's
    identity (see :func:`prepare_output`) is stored in the metadata under ``identity``.
    Returns the output path (None for stdout).
    """
    if layout is None:
        return None
    metadata = dict(metadata or {})
    metadata.setdefault("identity", _read_run_file(layout.work_dir).get("identity", {}))
    missing = [rank for rank in range(world_size) if not (layout.work_dir / f"done-{layout.run}-r{rank}.json").exists()]
    if missing:
        raise OutputError(
            f"rank(s) {', '.join(map(str, missing))} did not finish; the finished parts are kept in "
            f"{layout.work_dir}: rerun with --resume"
        )
    schema = schema_with_metadata(table_schema(extra_schema, all_scores), metadata)
    _write_labels_of(layout.output, schema)
    sources = layout._sources()
    masks = _winner_masks(sources)
    if layout.kind == "dataset":
        _finalize_dataset(layout, sources, masks, schema)
    else:
        with atomic_path(layout.output) as temporary:
            if layout.kind == "parquet":
                _write_parquet(Path(temporary), sources, masks, schema, row_group_rows)
            else:
                _write_jsonl(Path(temporary), sources, masks, schema)
        if layout.kind == "jsonl":
            write_json(layout.meta_path, metadata)
    shutil.rmtree(layout.work_dir, ignore_errors=True)
    _unlock_output(layout.output)
    return layout.output


def _selected(path: Path, mask: np.ndarray | None, schema: pa.Schema) -> pa.Table:
    table = _read_source(path, schema)
    return table if mask is None else table.filter(pa.array(mask))


def _write_parquet(
    target: Path, sources: Sequence[Path], masks: Sequence[np.ndarray | None], schema: pa.Schema, row_group_rows: int
) -> None:
    with pq.ParquetWriter(target, schema) as writer:
        for source, mask in zip(sources, masks):
            writer.write_table(_selected(source, mask, schema), row_group_size=row_group_rows)


def _write_jsonl(target: Path, sources: Sequence[Path], masks: Sequence[np.ndarray | None], schema: pa.Schema) -> None:
    with target.open("w", encoding="utf-8") as handle:
        for source, mask in zip(sources, masks):
            table = _selected(source, mask, schema)
            for batch in table.to_batches(max_chunksize=4096):
                handle.write(rows_to_jsonl(batch))


def _finalize_dataset(
    layout: OutputLayout, sources: Sequence[Path], masks: Sequence[np.ndarray | None], schema: pa.Schema
) -> None:
    staging = layout.output.with_name(f".tmp-{layout.output.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for source, mask in zip(sources, masks):
            target = staging / source.name
            if mask is None and source.parent == layout.work_dir:
                os.replace(source, target)
            elif mask is None:  # a file of the earlier output: share it rather than rewrite it
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy2(source, target)
            else:
                pq.write_table(_selected(source, mask, schema), target)
        pq.write_metadata(schema, staging / "_common_metadata")
        old = None
        if layout.output.exists():
            old = layout.output.with_name(f".old-{layout.output.name}-{os.getpid()}")
            os.replace(layout.output, old)
        os.replace(staging, layout.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def count_rows(path: str | os.PathLike) -> int:
    """Rows in a finished tag table (for summaries and tests)."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    files = _dataset_files(path) if path.is_dir() else [path]
    return sum(pq.ParquetFile(file).metadata.num_rows for file in files)


# ---------------------------------------------------------------------------------------------
# Runs of work units: the ledger says which parts (minus which keys) hold each unit's rows, exactly once


def _unit_pieces(work_dir: Path, entries: Sequence[LedgerEntry], schema: pa.Schema) -> Iterator[pa.Table]:
    """Every committed row, unit by unit, one row group at a time (never the whole table)."""
    for entry in entries:
        for name in entry.parts:
            dropped = entry.drop.get(name)
            parquet = pq.ParquetFile(work_dir / name)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                if dropped:
                    table = table.filter(pc.invert(pc.is_in(table["key"], value_set=pa.array(dropped, pa.string()))))
                yield table.replace_schema_metadata(schema.metadata)


def assemble_units(
    output: Path,
    kind: str,
    work_dir: Path,
    entries: Sequence[LedgerEntry],
    schema: pa.Schema,
    *,
    row_group_rows: int = 65_536,
) -> None:
    """Write the final output from the committed parts of ``entries`` (in unit order), by streaming.

    A ``.parquet`` or ``.jsonl`` file is written aside and renamed into place. A dataset folder gets the
    parts themselves (hard links, or filtered copies where the ledger drops rows), named by unit, and
    ``_SUCCESS`` last: while it is missing the folder is being updated; parts no unit lists any more go.
    The vocabulary goes to :func:`label_file_path` first.
    """
    _write_labels_of(output, schema)
    if kind == "dataset":
        _sync_dataset(output, work_dir, entries, schema)
        return
    with atomic_path(output) as temporary:
        if kind == "parquet":
            with pq.ParquetWriter(temporary, schema) as writer:
                for table in _unit_pieces(work_dir, entries, schema):
                    writer.write_table(table, row_group_size=row_group_rows)
        else:
            with open(temporary, "w", encoding="utf-8") as handle:
                for table in _unit_pieces(work_dir, entries, schema):
                    for batch in table.to_batches(max_chunksize=4096):
                        handle.write(rows_to_jsonl(batch))


def _link_or_copy(source: Path, target: Path, scratch: Path) -> None:
    scratch.unlink(missing_ok=True)
    try:
        os.link(source, scratch)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, scratch)
    os.replace(scratch, target)


def _sync_dataset(output: Path, work_dir: Path, entries: Sequence[LedgerEntry], schema: pa.Schema) -> None:
    output.mkdir(parents=True, exist_ok=True)
    success = output / SUCCESS_FILE
    success.unlink(missing_ok=True)
    wanted: dict[str, list[str] | None] = {}
    for entry in entries:
        for name in entry.parts:
            wanted[name] = entry.drop.get(name)
    for name, dropped in wanted.items():
        source, target, scratch = work_dir / name, output / name, work_dir / f".out-{name}"
        if dropped:
            parquet = pq.ParquetFile(source)
            scratch.unlink(missing_ok=True)
            with pq.ParquetWriter(scratch, parquet.schema_arrow) as writer:
                for group in range(parquet.num_row_groups):
                    table = parquet.read_row_group(group)
                    writer.write_table(
                        table.filter(pc.invert(pc.is_in(table["key"], value_set=pa.array(dropped, pa.string()))))
                    )
            os.replace(scratch, target)
        elif not (target.exists() and os.path.samefile(source, target)):
            _link_or_copy(source, target, scratch)
    for path in output.iterdir():  # parts of superseded attempts, an older run's metadata files
        if path.name != SUCCESS_FILE and path.name not in wanted:
            path.unlink()
    success.write_bytes(b"")
