"""Work units: the plan of a run as a small list of units, each read on its own.

A unit is one shard, a run of row groups of a table that holds its images (``--image-column``,
:mod:`ramtag.data.image_tables`), or one row group of the *listing*: the image files that folders, lists, stdin
and manifests name, spilled once by rank 0 into ``listing.arrow`` in the output's work directory
with one record batch per unit. The unit list (``units.json``) is all a rank or DataLoader worker
receives; each reads its own unit's rows from the listing, so nothing of size O(images) is
broadcast or pickled. Both files are frozen at the first run: a resumed run reuses them (stdin
cannot be read twice), and only the shard inputs may change (a shard is known by its name, the
prefix of its row keys, so ``pipe:curl …/a.tar`` and ``a.tar`` are the same unit).

:class:`UnitDataset` yields the records of each unit, then a :class:`UnitEnd` that tells the writer
the unit is complete and which earlier rows of it are kept (see :mod:`ramtag.data.ledger`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset

from ramtag.atomic import write_json
from ramtag.data.image_tables import is_table_input
from ramtag.data.images import PIL_LIMIT
from ramtag.data.listing import BASE_COLUMNS, IMAGE_EXTENSIONS, MANIFEST_EXTENSIONS, has_suffix, printable
from ramtag.data.listing_file import (
    LISTING_FILE,
    ListingWriter,
    RepeatedKeys,
    RepeatFilter,
    open_listing,
    remove_quietly,
    rewrite_listing,
)
from ramtag.data.manifests import open_manifest
from ramtag.data.records import Batch, FileDataset, Record, Transform, collate_records, split_by_node_and_worker
from ramtag.data.shard_columns import parse_shard_columns
from ramtag.data.shards import ShardDataset, is_shard_input, shard_name
from ramtag.data.sources import Listed, list_inputs, plan_inputs
from ramtag.data.table_records import table_records, table_unit_fields
from ramtag.errors import UsageError
from ramtag.messages import listed

UNITS_FILE = "units.json"
UNIT_ROWS = 16_384
MIN_UNIT_ROWS = 64


@dataclass(frozen=True)
class Unit:
    """One unit of work: a shard (``url``, known by ``name``), row group ``group`` of the listing, or
    ``count`` row groups (record batches) from ``first`` on of the table ``url`` in format ``name``."""

    id: int
    kind: str
    rows: int = 0
    group: int = -1
    url: str = ""
    name: str = ""
    columns: tuple[str, ...] = ()
    """What a shard or table unit carries (``--keep-columns`` as given); the listing holds its own."""
    image_column: str = ""
    key_column: str = ""
    first: int = 0
    count: int = 0
    start_row: int = 0
    """A table unit's first row in its file (row keys count rows of the file)."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Unit:
        return cls(**{**values, "columns": tuple(values.get("columns", ()))})

    @property
    def error_key(self) -> str | None:
        """The key of the row that records a shard or table unit that could not be read to its end."""
        if self.kind == "table":
            return f"{printable(self.url)}:{self.start_row}-{self.start_row + self.rows - 1}"
        return f"{printable(self.name)}/" if self.kind == "shard" else None


@dataclass(frozen=True)
class UnitTask:
    """A unit to (re)do, with the committed parts whose rows it keeps (minus ``drop``'s keys per part)."""

    unit: Unit
    parts: tuple[str, ...] = ()
    drop: dict[str, list[str]] = field(default_factory=dict)
    retry_errors: bool = False


@dataclass
class UnitEnd:
    """The last item of a unit in the record stream: what the unit's ledger line needs besides the new rows."""

    unit: int
    unit_error: str | None
    kept_parts: tuple[str, ...]
    kept_rows: int
    kept_errors: int
    drop: dict[str, list[str]]


@dataclass
class UnitPlan:
    """Every unit of the run (frozen listing and shards), and the carried manifest columns."""

    units: list[Unit]
    extra_schema: pa.Schema
    listing: Path


def _listing_spec(
    inputs: Sequence[str], path_column: str, keep_columns: Sequence[str], root: Any, image_column: str | None,
    key_column: str | None,
) -> dict:
    spec = {
        "file_inputs": [item for item in inputs if not is_shard_input(item)],
        "path_column": path_column,
        "keep_columns": list(keep_columns),
        "root": None if root is None else os.fspath(root),
    }
    if image_column:  # only when given, so that runs frozen by an older ramtag still match
        spec.update(image_column=image_column, key_column=key_column)
    return spec


def plan_units(
    inputs: Sequence[str],
    work_dir: Path,
    *,
    unit_rows: int = UNIT_ROWS,
    path_column: str = "path",
    keep_columns: Sequence[str] = (),
    stdin: TextIO | None = None,
    root: str | os.PathLike | None = None,
    on_warning: Callable[[str], None] | None = None,
    allow_empty: bool = False,
    spread_over: int = 1,
    image_column: str | None = None,
    key_column: str | None = None,
) -> UnitPlan:
    """The units of a run (rank 0): from ``units.json`` when an earlier run of this output froze them, else
    listed now, the listing written to the work directory. Refuses a run that finds no image at all.

    A unit of the listing holds ``unit_rows`` rows, or fewer (down to ``MIN_UNIT_ROWS``) so that a short
    listing still makes ``spread_over`` units: one DataLoader worker reads a unit, and every worker of
    every rank should have one."""
    spec = _listing_spec(inputs, path_column, keep_columns, root, image_column, key_column)
    frozen = _read_units_file(work_dir)
    listing = work_dir / LISTING_FILE
    if frozen is not None:
        if frozen["spec"] != spec:
            raise UsageError(
                f"the run in {work_dir} listed {listed_inputs(frozen['spec']['file_inputs'])} with its options; "
                "resume with the same image inputs (only shards may change), or pass --overwrite to start over"
            )
        units = [Unit.from_dict(unit) for unit in frozen["units"]]
        shard_inputs = [item for item in inputs if is_shard_input(item)]
        if shard_inputs != frozen["shard_inputs"]:
            shards = plan_inputs(shard_inputs, keep_columns=keep_columns, on_warning=on_warning).shards
            units = _merge_shards(units, shards, keep_columns)
            _write_units_file(work_dir, spec, shard_inputs, units)
        return UnitPlan(units, _extra_schema(listing), listing)
    listed, groups = _spill_listing(
        listing, unit_rows, spread_over, inputs, path_column=path_column, keep_columns=keep_columns, stdin=stdin,
        root=root, on_warning=on_warning, image_column=image_column, key_column=key_column,
    )
    if not sum(groups) and not listed.shards and not listed.tables and not allow_empty:
        remove_quietly(listing)
        raise UsageError(describe_empty_inputs(inputs))
    units = [Unit(index, "rows", rows=rows, group=index) for index, rows in enumerate(groups)]
    tables = table_unit_fields(listed.tables, unit_rows, image_column or "", key_column, keep_columns)
    units += [Unit(len(units) + index, **fields) for index, fields in enumerate(tables)]
    units = _merge_shards(units, listed.shards, keep_columns)
    _write_units_file(work_dir, spec, [item for item in inputs if is_shard_input(item)], units)
    return UnitPlan(units, listed.extra_schema, listing)


def _spill_listing(
    listing: Path, unit_rows: int, spread_over: int, inputs: Sequence[str], **options: Any
) -> tuple[Listed, list[int]]:
    """List ``inputs`` straight into ``listing``, one record batch per unit; returns the rows of each unit.

    The rows stream to a first file in batches of ``unit_rows`` while their keys' hashes go to the repeat check;
    only when keys repeat, or the listing is short enough that its units must shrink (``spread_over``), is that
    file rewritten. Memory stays at a unit of rows and the list of unit sizes."""
    first = listing.with_name(f".{listing.name}.{os.getpid()}.first")
    listing.parent.mkdir(parents=True, exist_ok=True)
    try:
        with RepeatedKeys(listing.parent) as repeats:
            writer: ListingWriter | None = None

            def emit(batch: pa.RecordBatch) -> None:
                nonlocal writer
                if writer is None:
                    writer = ListingWriter(first, batch.schema, unit_rows)
                writer.write(batch)
                repeats.add(batch.column(0))

            try:
                listed = list_inputs(inputs, emit, batch_rows=unit_rows, **options)
                if writer is None:  # no image file: the listing still records the carried columns
                    writer = ListingWriter(first, listed.schema, unit_rows)
            finally:
                if writer is not None:
                    writer.close()
            suspects = repeats.suspects()
        sizes = writer.sizes
        if suspects:
            drop = RepeatFilter(suspects)
            second = first.with_suffix(".second")
            sizes = rewrite_listing(first, second, unit_rows, drop)
            os.replace(second, first)
            listed.repeats_dropped(drop.dropped, options.get("on_warning"))
        rows = sum(sizes)
        rows_per_unit = max(1, min(unit_rows, max(MIN_UNIT_ROWS, -(-rows // max(1, spread_over)))))
        if rows_per_unit != unit_rows and rows:
            sizes = rewrite_listing(first, listing, rows_per_unit)
        else:
            os.replace(first, listing)
        return listed, sizes
    finally:
        remove_quietly(first)


def check_input_columns(
    inputs: Sequence[str], *, keep_columns: Sequence[str] = (), image_column: str | None = None,
    key_column: str | None = None, path_column: str = "path", root: str | os.PathLike | None = None,
) -> None:
    """What can be checked of the path, carried and image columns in a second, before a model loads: the
    schemas of local manifests and tables (footers or first blocks only) and the first sample of the first local
    shard. Remote inputs are checked when the run is planned."""
    quick = [
        item for item in inputs
        if "://" not in item and not item.startswith("pipe:")
        and ((is_shard_input(item) and keep_columns) or (image_column and is_table_input(item)))
    ]
    tables = image_column is not None and any(is_table_input(item) for item in quick)
    if quick:  # (without tables here, --image-column is checked against every input when the run is planned)
        plan_inputs(
            quick, keep_columns=keep_columns, image_column=image_column if tables else None,
            key_column=key_column if tables else None,
        )
    base = Path(root) if root is not None else None
    for item in inputs:
        if (has_suffix(item, MANIFEST_EXTENSIONS) and "://" not in item and os.path.isfile(item)
                and not (image_column and is_table_input(item))):
            open_manifest(item, path_column, keep_columns, base)


def listed_inputs(items: Sequence[str]) -> str:
    return listed(items, 3, quote=False) if items else "no images"


def _merge_shards(units: list[Unit], shards: Sequence[str], columns: Sequence[str] = ()) -> list[Unit]:
    """Shards by name: a known name keeps its unit (and takes the new URL), a new one gets the next unit id."""
    by_name = {unit.name: index for index, unit in enumerate(units) if unit.kind == "shard"}
    merged = list(units)
    next_id = max((unit.id for unit in units), default=-1) + 1
    for url in shards:
        name = shard_name(url)
        if name in by_name:
            old = merged[by_name[name]]
            merged[by_name[name]] = Unit(old.id, "shard", url=url, name=name, columns=tuple(columns))
        else:
            by_name[name] = len(merged)
            merged.append(Unit(next_id, "shard", url=url, name=name, columns=tuple(columns)))
            next_id += 1
    return merged


def _extra_schema(listing: Path) -> pa.Schema:
    schema = open_listing(listing).schema
    return pa.schema([field for field in schema if field.name not in BASE_COLUMNS])


def _read_units_file(work_dir: Path) -> dict | None:
    try:
        return json.loads((work_dir / UNITS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _write_units_file(work_dir: Path, spec: dict, shard_inputs: list[str], units: Sequence[Unit]) -> None:
    write_json(work_dir / UNITS_FILE, {"spec": spec, "shard_inputs": shard_inputs, "units": [asdict(u) for u in units]})


_FOUND_KINDS = (".tar", ".tar.gz", ".tgz", ".arrow", ".parquet")


def describe_empty_inputs(inputs: Sequence[str]) -> str:
    """Why a run found no image: what each folder given holds, and what ramtag expected there."""
    found = []
    for item in inputs:
        if not os.path.isdir(item):
            continue
        counts: dict[str, int] = {}
        seen = 0
        for _, _, names in os.walk(item):
            for name in names:
                lowered = name.lower()
                kind = next((suffix for suffix in _FOUND_KINDS if lowered.endswith(suffix)), "")
                counts[kind or "other"] = counts.get(kind or "other", 0) + 1
            seen += len(names)
            if seen > 100_000:
                break
        shards = counts.get(".tar", 0) + counts.get(".tar.gz", 0) + counts.get(".tgz", 0)
        tables = counts.get(".parquet", 0)
        if shards:
            found.append(
                f"{item} holds {shards} shard(s): shards go in as '{item.rstrip('/')}/*.tar' or a brace pattern "
                f"such as '{item.rstrip('/')}/{{000000..000009}}.tar'"
            )
        elif counts.get(".arrow"):
            found.append(
                f"{item} holds {counts['.arrow']} .arrow file(s), a Hugging Face save_to_disk folder: tag its "
                "images with --image-column COL (the image column, e.g. image)"
            )
        elif tables:
            found.append(
                f"{item} holds {tables} .parquet file(s): tag the images they hold with --image-column COL, or "
                "name a manifest of paths as a file"
            )
        elif counts:
            found.append(f"{item} holds {sum(counts.values())} file(s), none of them an image")
        else:
            found.append(f"{item} is empty")
    expected = f"image files ({' '.join(sorted(IMAGE_EXTENSIONS))}) in a folder or below, lists, manifests or shards"
    detail = "; ".join(found) if found else "the inputs name no image"
    return f"no images to tag: {detail}; expected {expected} (pass --allow-empty to write an empty table)"


# ---------------------------------------------------------------------------------------------
# Reading units


def _kept_rows(work_dir: Path, task: UnitTask) -> tuple[dict[str, tuple[str, bool]], dict[str, list[str]]]:
    """The committed rows of a unit being redone, one row per key: ``key -> (part, is_error)``, and the
    drop lists extended by rows that a newer one of the same key supersedes (good over error, newest last)."""
    winners: dict[str, tuple[str, bool]] = {}
    drop = {part: list(keys) for part, keys in task.drop.items()}
    for part in task.parts:
        already = set(drop.get(part, ()))
        table = pq.read_table(work_dir / part, columns=["key", "error"])
        for key, is_error in zip(table["key"].to_pylist(), pc.is_valid(table["error"]).to_pylist()):
            if key in already:
                continue
            previous = winners.get(key)
            if previous is not None:
                if is_error and not previous[1]:
                    drop.setdefault(part, []).append(key)
                    continue
                drop.setdefault(previous[0], []).append(key)
            winners[key] = (part, is_error)
    return winners, drop


class UnitDataset(IterableDataset):
    """The records of each task's unit, then its :class:`UnitEnd`. With ``claim``, each process reading the
    dataset (a DataLoader worker, or the caller's) asks it for the index of its next task until it returns None;
    without, DataLoader worker ``w`` of ``n`` takes every ``n``-th task. A unit being redone skips the keys it
    keeps, so its rows end up exactly once."""

    def __init__(
        self,
        tasks: Sequence[UnitTask],
        work_dir: Path,
        listing: Path,
        transform: Transform,
        *,
        max_pixels: int | None = PIL_LIMIT,
        draft_size: int | None = None,
        claim: Callable[[], int | None] | None = None,
    ) -> None:
        self.tasks = list(tasks)
        self.claim = claim
        self.work_dir = Path(work_dir)
        self.listing = Path(listing)
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self._listing_file: pa.ipc.RecordBatchFileReader | None = None

    def assigned_tasks(self) -> list[UnitTask]:
        return split_by_node_and_worker(self.tasks)

    def __iter__(self) -> Iterator[Record | UnitEnd]:
        if self.claim is None:
            for task in self.assigned_tasks():
                yield from self.read_unit(task)
            return
        while (index := self.claim()) is not None:
            yield from self.read_unit(self.tasks[index])

    def read_unit(self, task: UnitTask) -> Iterator[Record | UnitEnd]:
        unit = task.unit
        winners, drop = _kept_rows(self.work_dir, task) if task.parts else ({}, dict(task.drop))
        error_key = unit.error_key
        replaceable = {
            key: part
            for key, (part, is_error) in winners.items()
            if is_error and (task.retry_errors or key == error_key)
        }
        skip = {key for key in winners if key not in replaceable}
        unit_error = None
        for record in self._records(unit, skip):
            record.unit = unit.id
            if error_key is not None and record.key == error_key:
                unit_error = record.error
            part = replaceable.pop(record.key, None)
            if part is not None:  # a new row of this key replaces the earlier error row
                drop.setdefault(part, []).append(record.key)
                del winners[record.key]
            yield record
        if unit_error is None and error_key in replaceable:  # read to its end this time: the unit error heals
            drop.setdefault(replaceable[error_key], []).append(error_key)
            del winners[error_key]
        yield UnitEnd(
            unit.id,
            unit_error,
            tuple(task.parts),
            len(winners),
            sum(1 for _, is_error in winners.values() if is_error),
            {part: keys for part, keys in drop.items() if keys},
        )

    def _records(self, unit: Unit, skip: set[str]) -> Iterator[Record]:
        if unit.kind == "shard":
            reader = ShardDataset(
                [unit.url], self.transform, skip_keys=skip, max_pixels=self.max_pixels, draft_size=self.draft_size,
                columns=parse_shard_columns(unit.columns),
            )
            yield from reader.read_shard(unit.url)
            return
        if unit.kind == "table":
            yield from table_records(unit, self.transform, skip, self.max_pixels, self.draft_size)
            return
        if self._listing_file is None:  # opened once per worker: its footer is O(units), 24 bytes a unit
            self._listing_file = open_listing(self.listing)
        rows = pa.Table.from_batches([self._listing_file.get_batch(unit.group)])
        if skip:
            rows = rows.filter(pc.invert(pc.is_in(rows["key"], value_set=pa.array(list(skip), pa.string()))))
        files = FileDataset(rows, self.transform, max_pixels=self.max_pixels, draft_size=self.draft_size)
        for index in range(len(files)):
            yield files[index]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_listing_file"] = None  # each worker opens its own
        return state


def collate_unit_records(items: Sequence[Record | UnitEnd]) -> Batch:
    """Like :func:`~ramtag.data.records.collate_records`, with the units that ended in this batch in ``ended``."""
    records = [item for item in items if not isinstance(item, UnitEnd)]
    batch = collate_records(records)
    batch.ended = [item for item in items if isinstance(item, UnitEnd)]
    return batch
