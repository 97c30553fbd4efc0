"""The plan stage: turn command-line inputs into an :class:`InputPlan` of image files and WebDataset shards.

Inputs, in any mix: directories (recursive), single files, ``@list.txt``, ``-`` (paths on stdin),
manifests (``.parquet``, ``.csv``, ``.jsonl``) and shards (local tars, brace patterns, ``pipe:``
commands, URLs). What each kind names is listed by :mod:`ramtag.data.listing`, shards are checked by
:mod:`ramtag.data.shards`. With ``image_column``, Parquet and Arrow files (and folders of them, and
``datasets`` ``save_to_disk`` folders) are tables that hold their images (see
:mod:`ramtag.data.image_tables`); they are listed in ``InputPlan.tables`` and read by work unit, never here.

The stages after the plan: :mod:`ramtag.data.units` (work units), :mod:`ramtag.data.shards` and
:mod:`ramtag.data.records` (samples, decode, batch), :mod:`ramtag.data.labelled` (labels, for train and eval).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc

from ramtag.data import storage
from ramtag.data.image_tables import (
    RENAMED_COLUMNS,
    is_table_input,
    merged_schema,
    output_column,
    table_files,
    tables_carried_schema,
)
from ramtag.data.listing import (
    MANIFEST_EXTENSIONS,
    Listing,
    Warn,
    add_directory,
    add_list_file,
    add_listed,
    add_remote,
    expand_pattern,
    has_suffix,
    listing_schema,
)
from ramtag.data.listing_file import RepeatedKeys, RepeatFilter
from ramtag.data.manifests import add_manifest, open_manifest
from ramtag.data.records import check_rank
from ramtag.data.shard_columns import parse_shard_columns
from ramtag.data.shards import (
    checked_shard,
    is_shard_input,
    refuse_shared_shard_names,
    shard_schema,
    shard_split_problem,
)
from ramtag.errors import DataError, UsageError


@dataclass
class InputPlan:
    """What a run will read: image files (an Arrow table) and shard URLs, plus warnings.

    ``files`` has columns ``key``, ``source``, ``path``, ``error`` (set when the item is known bad
    before decoding) and the carried manifest columns (null for items from other inputs).
    Kept in Arrow so that tens of millions of items stay compact and DataLoader workers share it.
    """

    files: pa.Table
    shards: list[str]
    extra_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))
    warnings: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    """Parquet/Arrow files that hold their images (``image_column``), read by work unit."""

    def files_for_rank(self, rank: int, world_size: int) -> pa.Table:
        """This rank's share of files: every ``world_size``-th item from ``rank`` on."""
        check_rank(rank, world_size)
        if world_size == 1:
            return self.files
        return self.files.take(pa.array(range(rank, self.files.num_rows, world_size), pa.int64()))

    def without_keys(self, done: Iterable[str]) -> InputPlan:
        """The plan minus files whose key is in ``done`` (resume); shards are filtered per sample."""
        done = list(done)
        if not done or self.files.num_rows == 0:
            return self
        keep = pc.invert(pc.is_in(self.files["key"], value_set=pa.array(done, pa.string())))
        return InputPlan(self.files.filter(keep), self.shards, self.extra_schema, self.warnings, self.tables)

    def shard_split_problem(self, world_size: int, workers: int) -> str | None:
        """A message when shards cannot keep every rank's DataLoader workers busy, else None."""
        return shard_split_problem(len(self.shards), world_size, workers)


@dataclass
class Listed:
    """What :func:`list_inputs` found beside the rows it handed on: shards, tables, the carried columns."""

    shards: list[str]
    tables: list[str]
    extra_schema: pa.Schema
    schema: pa.Schema
    """The listing's own: key, source, path, error, then the carried columns."""
    rows: int
    warnings: list[str]

    def repeats_dropped(self, dropped: int, on_warning: Warn | None) -> None:
        """Say that ``dropped`` exact repeats were left out (every planner that drops them says it so)."""
        message = f"{dropped} input(s) named more than once; each is tagged once"
        self.warnings.append(message)
        if on_warning is not None:
            on_warning(message)


def list_inputs(
    inputs: Sequence[str],
    emit: Callable[[pa.RecordBatch], None],
    *,
    batch_rows: int = 16_384,
    path_column: str = "path",
    keep_columns: Sequence[str] = (),
    stdin: TextIO | None = None,
    root: str | os.PathLike | None = None,
    on_warning: Warn | None = None,
    image_column: str | None = None,
    key_column: str | None = None,
) -> Listed:
    """List what ``inputs`` name, without decoding any image, handing the image files to ``emit`` in record
    batches as they are found (repeated keys are not dropped here: see :func:`plan_inputs`).

    Every input is checked first (patterns, paths, manifest columns, shards, tables), so that a mistake in the
    last input is reported before the first folder is walked; then the files are listed in input order.
    ``keep_columns`` names manifest columns, columns of image tables and, for shards, members, JSON fields
    and ``__key__`` (:mod:`ramtag.data.shard_columns`); every input of those kinds must have them. A column
    named like one of ramtag's own (``key``) is carried under another name (``source_key``), with a warning.

    Missing command-line paths, unreadable lists or manifests and unexpanded or empty patterns raise
    :class:`DataError`; missing files named inside lists or manifests become error rows later. Directory
    problems (unreadable folders, symlink loops, broken links) are warnings: passed to ``on_warning`` and kept.
    """
    if not inputs:
        raise DataError("no inputs given")
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        if on_warning is not None:
            on_warning(message)

    base = Path(root) if root is not None else None
    listed: list[tuple[str, object]] = []
    shards: list[str] = []
    tables: list[str] = []
    manifest_schema: pa.Schema | None = None
    for raw in inputs:
        for item in expand_pattern(raw):
            if item == "-":
                if any(kind == "stdin" for kind, _ in listed):
                    raise DataError("'-' (paths on stdin) given more than once")
                listed.append(("stdin", item))
            elif item.startswith("@"):
                listed.append(("list", item[1:]))
            elif image_column and is_table_input(item):
                tables.extend(table_files(item))
            elif is_shard_input(item):
                shards.append(checked_shard(item))
            elif has_suffix(item, MANIFEST_EXTENSIONS):
                manifest = open_manifest(item, path_column, keep_columns, base)
                manifest_schema = manifest_schema or manifest.extra_schema
                listed.append(("manifest", manifest))
            elif storage.is_remote(item):
                listed.append(("remote", item))
            elif os.path.isdir(item):
                listed.append(("folder", item))
            elif os.path.exists(item):
                listed.append(("file", item))
            elif "://" in item:
                raise DataError(f"{item}: remote inputs must be WebDataset shards (.tar)")
            else:
                raise DataError(f"{item}: no such file or directory")
    if key_column and not image_column:
        raise UsageError("--key-column names the key column of tables read with --image-column")
    if image_column and not tables:
        raise UsageError(
            f"--image-column {image_column}: no input is a table that holds images (.parquet, .arrow, a folder of "
            "them or a Hugging Face save_to_disk folder)"
        )
    if keep_columns and manifest_schema is None and not shards and not tables:
        raise UsageError(
            "--keep-columns carries manifest columns (or table columns, shard members), but no manifest "
            "(.parquet, .csv, .jsonl), table (--image-column) or shard was given"
        )
    unique_tables = list(dict.fromkeys(tables))
    unique_shards = list(dict.fromkeys(shards))
    if len(unique_shards) < len(shards):
        warn(f"{len(shards) - len(unique_shards)} shard(s) named more than once; each is read once")
    refuse_shared_shard_names(unique_shards)
    schemas = [manifest_schema] if manifest_schema is not None else []
    if unique_tables:
        schemas.append(tables_carried_schema(unique_tables, image_column or "", key_column, keep_columns))
    if unique_shards and keep_columns:
        schemas.append(shard_schema(unique_shards[0], parse_shard_columns(keep_columns)))
    carried = merged_schema(schemas)
    for name in keep_columns:
        if name in RENAMED_COLUMNS:
            warn(f"--keep-columns {name}: written as column {output_column(name)} ({name} is ramtag's row key)")
    collector = Listing(listing_schema(carried), emit, batch_rows)
    for kind, item in listed:
        if kind == "stdin":
            add_listed(collector, stdin if stdin is not None else _default_stdin(), "-", base, warn)
        elif kind == "list":
            add_list_file(collector, str(item), base, warn)
        elif kind == "manifest":
            add_manifest(collector, item, warn)  # type: ignore[arg-type]
        elif kind == "remote":
            add_remote(collector, str(item), warn)
        elif kind == "folder":
            add_directory(collector, str(item), warn)
        else:
            collector.add(str(item), str(item), str(item))
    collector.flush()
    return Listed(unique_shards, unique_tables, carried, collector.schema, collector.rows, warnings)


def plan_inputs(
    inputs: Sequence[str],
    *,
    path_column: str = "path",
    keep_columns: Sequence[str] = (),
    stdin: TextIO | None = None,
    root: str | os.PathLike | None = None,
    on_warning: Warn | None = None,
    image_column: str | None = None,
    key_column: str | None = None,
) -> InputPlan:
    """:func:`list_inputs` into one Arrow table, for runs that keep their files in memory (explain, training and
    evaluation): exact repeats (same key, same path) dropped with a warning, one key for two files refused.
    ``tag`` spills its listing instead (:func:`ramtag.data.units.plan_units`)."""
    batches: list[pa.RecordBatch] = []
    listed = list_inputs(
        inputs, batches.append, path_column=path_column, keep_columns=keep_columns, stdin=stdin, root=root,
        on_warning=on_warning, image_column=image_column, key_column=key_column,
    )
    files = pa.Table.from_batches(batches, listed.schema)
    if files.num_rows > 1 and pc.count_distinct(files["key"]).as_py() < files.num_rows:
        with RepeatedKeys() as repeats:
            for batch in batches:
                repeats.add(batch.column(0))
            drop = RepeatFilter(repeats.suspects())
        files = pa.Table.from_batches(list(drop(batches)), listed.schema)
        listed.repeats_dropped(drop.dropped, on_warning)
    return InputPlan(files, listed.shards, listed.extra_schema, listed.warnings, listed.tables)


def _default_stdin() -> TextIO:
    import sys

    return sys.stdin
