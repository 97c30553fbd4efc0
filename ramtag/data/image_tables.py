"""Tables that hold their images: Parquet and Arrow files with an image column, read a few rows at a time.

With ``--image-column COL`` these inputs hold images themselves instead of naming image files:

- a ``.parquet`` file, or a folder of them (the Hugging Face Hub's layout, ``data/train-00000-of-00004.parquet``);
- a ``.arrow`` file (Arrow IPC stream or file format), or a ``datasets`` ``save_to_disk`` folder
  (``dataset_info.json``, ``state.json`` and ``data-*.arrow``; a ``DatasetDict`` folder holds one per split).

``COL`` is binary (img2dataset's ``jpg`` column) or the Hugging Face image struct
``struct<bytes: binary, path: string>``. Row keys: the ``--key-column`` value when given, else the struct's
``path`` when present, else ``FILE:ROW`` (ROW counted from 0, as pyarrow, pandas, polars and DuckDB's
``file_row_number`` count rows). A key that repeats inside one work unit is written ``KEY (repeat N)``.

Planning reads only file footers and schemas; a work unit is a run of consecutive row groups (Parquet) or
record batches (Arrow) of one file, which the DataLoader worker reads from the file itself, a batch of rows
at a time, so no file is ever loaded whole and no image byte is copied into the listing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ramtag.errors import DataError, UsageError
from ramtag.messages import first_line

TABLE_SUFFIXES = (".parquet", ".arrow")
READ_ROWS = 64
"""Rows read from a table at a time: a few images' bytes in memory, not a row group's."""

_PROBE_ENTRIES = 10_000
RENAMED_COLUMNS = {"key": "source_key"}
"""Carried columns whose names are ramtag's own output columns, and the names they are written under."""


def output_column(name: str) -> str:
    """The output column a carried input column is written as (``key``, img2dataset's join key: ``source_key``)."""
    return RENAMED_COLUMNS.get(name, name)


@dataclass(frozen=True)
class TablePiece:
    """A run of consecutive row groups / record batches of one file: the extent of one work unit."""

    path: str
    format: str
    first: int
    count: int
    start_row: int
    rows: int


def is_save_to_disk_folder(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and (
        ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())
        or (folder / "dataset_dict.json").is_file()
    )


def is_table_input(item: str) -> bool:
    """Whether ``item`` is read as a table of images when ``--image-column`` is given."""
    lowered = item.lower()
    return lowered.endswith(TABLE_SUFFIXES) or (os.path.isdir(item) and bool(_folder_tables(item, probe=True)))


def table_files(item: str) -> list[str]:
    """The Parquet/Arrow files an input names, in order (a save_to_disk folder in its own order)."""
    if os.path.isdir(item):
        files = _folder_tables(item)
        if not files:
            raise DataError(f"{item}: no .parquet or .arrow files in this folder or below")
        return files
    if not os.path.isfile(item):
        raise DataError(f"{item}: no such file")
    return [item]


def _folder_tables(folder: str, probe: bool = False) -> list[str]:
    root = Path(folder)
    if (root / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one dataset folder per split
        try:
            splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        except (OSError, ValueError) as exc:
            raise DataError(f"{root / 'dataset_dict.json'}: cannot read ({exc})") from exc
        return [path for split in splits for path in _folder_tables(str(root / split), probe)]
    if (root / "state.json").is_file():
        try:
            state = json.loads((root / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{root / 'state.json'}: cannot read ({exc})") from exc
        return [str(root / entry["filename"]) for entry in state.get("_data_files", [])]
    found = []
    seen = 0
    for directory, subdirectories, names in os.walk(folder):
        subdirectories.sort()
        found.extend(os.path.join(directory, name) for name in sorted(names) if name.lower().endswith(".parquet"))
        seen += len(names)
        if probe and (found or seen > _PROBE_ENTRIES):  # a folder of images is not walked whole to say so
            break
    return found


# ---------------------------------------------------------------------------------------------
# Schemas and checks


def _format(path: str) -> str:
    return "arrow" if path.lower().endswith(".arrow") else "parquet"


def read_schema(path: str) -> pa.Schema:
    try:
        if _format(path) == "parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path)
        with _open_arrow(path) as reader:
            return reader.schema
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({first_line(exc)})") from exc
    except pa.ArrowException as exc:
        raise DataError(f"{path}: not a {_format(path).capitalize()} file ({first_line(exc)})") from exc


def is_image_type(kind: pa.DataType) -> bool:
    """Binary, or a struct with a binary ``bytes`` field (the Hugging Face image feature)."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and is_image_type(kind.field(index).type) and not pa.types.is_struct(kind.field(index).type)
    return False


def describe_type(kind: pa.DataType) -> str:
    return str(kind).replace("large_", "")


def image_columns_hint(schema: pa.Schema) -> str:
    """A sentence naming the columns that hold image bytes, for messages; empty when none does."""
    names = [field.name for field in schema if is_image_type(field.type)]
    if not names:
        return ""
    return f"; column {names[0]} holds image bytes: pass --image-column {names[0]}"


def check_path_column(path: str, column: str, kind: pa.DataType) -> None:
    """A manifest's path column must hold text: image bytes there mean --image-column was meant."""
    if is_image_type(kind):
        raise UsageError(
            f"{path}: column {column} holds image bytes ({describe_type(kind)}), not paths: "
            f"pass --image-column {column}"
        )
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind)
            or pa.types.is_null(kind)):
        raise UsageError(f"{path}: --path-column {column} is {describe_type(kind)}, not text paths")


def check_table_columns(
    path: str, schema: pa.Schema, image_column: str, key_column: str | None, keep_columns: Sequence[str]
) -> None:
    """Refuse missing columns and columns of the wrong type, in one line each."""
    names = schema.names
    wanted = [image_column] + ([key_column] if key_column else []) + list(keep_columns)
    missing = [name for name in dict.fromkeys(wanted) if name not in names]
    if missing:
        raise DataError(f"{path}: no column(s) {', '.join(missing)} (columns: {', '.join(names)})")
    kind = schema.field(image_column).type
    if not is_image_type(kind):
        paths = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        advice = f"; it holds text: for paths to image files use --path-column {image_column}" if paths else ""
        raise UsageError(
            f"{path}: --image-column {image_column} is {describe_type(kind)}, not image bytes "
            f"(binary, or struct<bytes: binary, path: string>){advice}{image_columns_hint(schema)}"
        )
    if image_column in keep_columns:
        raise UsageError(f"--keep-columns {image_column}: the image column's bytes are not copied into the output")
    if key_column:
        key_type = schema.field(key_column).type
        if pa.types.is_nested(key_type) or pa.types.is_binary(key_type) or pa.types.is_large_binary(key_type):
            raise UsageError(
                f"{path}: --key-column {key_column} is {describe_type(key_type)}; name a text or number column"
            )


def carried_schema(schema: pa.Schema, keep_columns: Sequence[str]) -> pa.Schema:
    """The output fields of the carried columns (renamed where they clash with ramtag's own)."""
    return pa.schema([pa.field(output_column(name), schema.field(name).type) for name in keep_columns])


def tables_carried_schema(
    tables: Sequence[str], image_column: str, key_column: str | None, keep: Sequence[str]
) -> pa.Schema:
    """Check every table's columns (schemas only) and return the carried columns' fields."""
    first: pa.Schema | None = None
    for path in tables:
        schema = read_schema(path)
        check_table_columns(path, schema, image_column, key_column, keep)
        carried = carried_schema(schema, keep)
        if first is None:
            first = carried
        elif not carried.equals(first):
            raise DataError(f"{path}: --keep-columns types differ from {tables[0]} ({carried} vs {first})")
    return first or pa.schema([])


def merged_schema(schemas: Sequence[pa.Schema]) -> pa.Schema:
    """Carried columns of every kind of input: one field per name, whose type all kinds must share."""
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for carried in schema:
            known = fields.setdefault(carried.name, carried)
            if not known.type.equals(carried.type):
                raise DataError(f"--keep-columns {carried.name}: one input holds {known.type}, another {carried.type}")
    return pa.schema(list(fields.values()))


# ---------------------------------------------------------------------------------------------
# Planning


def table_pieces(path: str, unit_rows: int) -> list[TablePiece]:
    """Consecutive row groups (record batches) of ``path`` grouped into pieces of about ``unit_rows`` rows.

    Reads the Parquet footer only; an Arrow file is walked batch by batch through a memory map, which
    touches each batch's header, not its data."""
    sizes = _group_sizes(path)
    pieces: list[TablePiece] = []
    first = start = rows = 0
    for index, size in enumerate(sizes):
        if rows and rows + size > unit_rows:
            pieces.append(TablePiece(path, _format(path), first, index - first, start, rows))
            first, start, rows = index, start + rows, 0
        rows += size
    if rows or (sizes and not pieces):
        pieces.append(TablePiece(path, _format(path), first, len(sizes) - first, start, rows))
    return [piece for piece in pieces if piece.rows]


def _group_sizes(path: str) -> list[int]:
    try:
        if _format(path) == "parquet":
            import pyarrow.parquet as pq

            metadata = pq.ParquetFile(path).metadata
            return [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]
        with _open_arrow(path) as reader:
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                return [reader.get_batch(index).num_rows for index in range(reader.num_record_batches)]
            return [batch.num_rows for batch in reader]
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read ({first_line(exc)})") from exc


class _open_arrow:
    """An Arrow IPC file or stream, memory-mapped: batches are read without copying their bytes."""

    def __init__(self, path: str) -> None:
        self.source = pa.memory_map(path, "r")
        try:
            self.reader: Any = pa.ipc.open_stream(self.source)
        except pa.ArrowInvalid:
            self.source.seek(0)
            self.reader = pa.ipc.open_file(self.source)

    def __enter__(self) -> Any:
        return self.reader

    def __exit__(self, *exc: object) -> None:
        self.source.close()


# ---------------------------------------------------------------------------------------------
# Reading


def iter_rows(piece: TablePiece, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of at most :data:`READ_ROWS` rows of ``columns`` over one piece, in row order."""
    if piece.format == "parquet":
        import pyarrow.parquet as pq

        handle = pq.ParquetFile(piece.path)
        try:
            groups = list(range(piece.first, piece.first + piece.count))
            yield from handle.iter_batches(batch_size=READ_ROWS, row_groups=groups, columns=list(columns))
        finally:
            handle.close()
        return
    with _open_arrow(piece.path) as reader:
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            batches: Any = (reader.get_batch(index) for index in range(piece.first, piece.first + piece.count))
        else:
            batches = (batch for index, batch in enumerate(reader) if piece.first <= index < piece.first + piece.count)
        for batch in batches:
            batch = batch.select(list(columns))
            for offset in range(0, batch.num_rows, READ_ROWS):
                yield batch.slice(offset, READ_ROWS)


def image_cell(value: Any) -> tuple[bytes | None, str | None]:
    """A cell of the image column -> (bytes, the struct's path); (None, _) when the row holds no bytes (a
    Hugging Face struct may hold only the path of a local file, which ``datasets`` then reads)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        return (bytes(data) if data is not None else None), (path or None)
    return (bytes(value) if value is not None else None), None


