"""Records of one table work unit (:mod:`ramtag.data.image_tables`): rows read from the file a few at a time.

A row whose image cell is null or whose bytes do not decode becomes an error row, as a bad file does; a unit
whose file cannot be read to the end of its rows ends with one error row keyed ``FILE:FIRST-LAST``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ramtag.data.image_tables import TablePiece, image_cell, iter_rows, output_column, table_pieces
from ramtag.data.listing import printable
from ramtag.data.records import Record, Transform, decode
from ramtag.messages import first_line


class Unit(Protocol):
    """What a table unit (:class:`ramtag.data.units.Unit`, which imports this module) holds."""

    url: str
    name: str
    rows: int
    columns: tuple[str, ...]
    image_column: str
    key_column: str
    first: int
    count: int
    start_row: int

    @property
    def error_key(self) -> str | None: ...


def table_unit_fields(
    tables: Sequence[str], unit_rows: int, image_column: str, key_column: str | None, keep: Sequence[str]
) -> list[dict[str, Any]]:
    """The fields of each table unit (for :class:`~ramtag.data.units.Unit`), file by file, in row order."""
    units = []
    for path in tables:
        for piece in table_pieces(path, unit_rows):
            units.append(
                dict(
                    kind="table", rows=piece.rows, url=path, name=piece.format, columns=tuple(keep),
                    image_column=image_column, key_column=key_column or "", first=piece.first, count=piece.count,
                    start_row=piece.start_row,
                )
            )
    return units


def table_records(
    unit: Unit, transform: Transform, skip: set[str], max_pixels: int | None, draft_size: int | None
) -> Iterator[Record]:
    """The unit's rows as records (keys in ``skip`` left out), ending with its error row if the file broke."""
    piece = TablePiece(unit.url, unit.name, unit.first, unit.count, unit.start_row, unit.rows)
    source = printable(unit.url)
    names = [unit.image_column] + ([unit.key_column] if unit.key_column else [])
    names += [name for name in unit.columns if name not in names]
    row = unit.start_row
    seen: dict[str, int] = {}
    try:
        for batch in iter_rows(piece, names):
            columns = {name: batch.column(index).to_pylist() for index, name in enumerate(names)}
            for offset in range(batch.num_rows):
                data, struct_path = image_cell(columns[unit.image_column][offset])
                key = _row_key(unit, columns, offset, struct_path, row + offset)
                repeats = seen[key] = seen.get(key, 0) + 1
                if repeats > 1:  # keys must stay unique within a unit for resume to skip exactly the done rows
                    key = f"{key} (repeat {repeats})"
                if key in skip:
                    continue
                extra = {output_column(name): columns[name][offset] for name in unit.columns}
                if data is None and struct_path:  # datasets stores local files by path unless embedded
                    data = _beside(struct_path, unit.url)
                if data is None:
                    yield Record(key, source, None, "no image bytes in this row", extra)
                    continue
                image, error = decode(data, transform, max_pixels, draft_size)
                yield Record(key, source, image, error, extra)
            row += batch.num_rows
    except Exception as exc:  # a corrupt page or a truncated file: record it, go on to the next unit
        key = unit.error_key
        if key not in skip:
            where = f" after row {row - 1}" if row > unit.start_row else ""
            yield Record(key, source, None, printable(f"cannot read table rows{where}: {first_line(exc)}"))


def _beside(path: str, table: str) -> str:
    """A struct's path as written, or beside the table when only that names a file."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(os.path.dirname(table), path)
    return candidate if os.path.exists(candidate) else path


def _row_key(unit: Unit, columns: dict[str, list[Any]], offset: int, struct_path: str | None, row: int) -> str:
    if unit.key_column:
        value = columns[unit.key_column][offset]
        if value is not None and str(value) != "":
            return printable(str(value))
    elif struct_path:
        return printable(struct_path)
    return printable(f"{unit.url}:{row}")
