"""The final table of a run of work units, assembled from the parts the ledger commits (each row once).

The table holds each unit's committed parts in unit order (rows within a unit in the order they were
written); sort by ``key`` for a canonical order.

Beside every output goes its vocabulary, ``OUT.labels.txt`` (``tags.parquet.labels.txt``; ``out.labels.txt``
for a dataset folder ``out/``, outside it: polars refuses a folder that mixes file extensions): one label per
line in the order of the ``scores`` column, readable back as ``--labels``. It outlives the Parquet schema
metadata, which pandas, polars and DuckDB drop when they rewrite a table. It is written atomically before the
table, so a finished table always has it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ramtag.atomic import atomic_path, write_json, write_text
from ramtag.data.layout import RUN_FILE, SUCCESS_FILE
from ramtag.data.ledger import LedgerEntry, latest_entries
from ramtag.data.rows import METADATA_KEY, rows_to_jsonl, schema_with_metadata
from ramtag.errors import OutputError

LABEL_FILE_SUFFIX = ".labels.txt"
ASSEMBLED_FILE = "assembled.json"
"""In the work directory: the ledger state the output was last assembled from."""

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


# ---------------------------------------------------------------------------------------------
# The end of a run


def run_identity(work_dir: Path) -> Any:
    """What the run in ``work_dir`` was started with (see :func:`ramtag.data.layout.prepare_output`)."""
    try:
        return json.loads((work_dir / RUN_FILE).read_text(encoding="utf-8")).get("identity", {})
    except (OSError, ValueError):
        return {}


def finish_units(
    output: Path, kind: str, work_dir: Path, unit_ids: Sequence[int], metadata: Mapping[str, Any], table: pa.Schema
) -> tuple[int, int]:
    """The finished table of a local output once every writer closed: ``(rows, error rows)``.

    Refuses while a unit of ``unit_ids`` has no ledger entry (its committed parts stay for ``--resume``).
    Assembles unless the output already holds this very ledger state (a ``--resume`` of a finished run rewrites
    nothing); ``table`` is the schema without metadata, which gets ``metadata`` and the run's identity. A JSONL
    output gets its metadata in ``OUT.meta.json``."""
    entries = latest_entries(work_dir)
    missing = [unit for unit in unit_ids if unit not in entries]
    if missing:
        raise OutputError(
            f"{len(missing)} work unit(s) did not finish; the committed parts are kept in {work_dir}: "
            "rerun with --resume"
        )
    ordered = [entries[unit] for unit in sorted(unit_ids)]
    stamp = _state_stamp(kind, ordered)
    marker = work_dir / ASSEMBLED_FILE
    if not (output.exists() and _read_stamp(marker) == stamp):
        stored = dict(metadata)
        stored.setdefault("identity", run_identity(work_dir))
        assemble_units(output, kind, work_dir, ordered, schema_with_metadata(table, stored))
        if kind == "jsonl":
            write_json(output.with_name(output.name + ".meta.json"), stored)
        write_json(marker, {"stamp": stamp})
    return sum(entry.rows for entry in ordered), sum(entry.errors for entry in ordered)


def _state_stamp(kind: str, entries: Sequence[LedgerEntry]) -> str:
    digest = hashlib.sha256(kind.encode())
    for entry in entries:
        digest.update(f"{entry.unit}:{entry.run};".encode())
    return digest.hexdigest()


def _read_stamp(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("stamp")
    except (OSError, ValueError):
        return None
