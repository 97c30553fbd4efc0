"""Turn command-line inputs into a plan of image files and WebDataset shards, and read them.

Inputs, in any mix: directories (recursive), single files, ``@list.txt``, ``-`` (paths on stdin),
manifests (``.parquet``, ``.csv``, ``.jsonl``) and shards (local tars, brace patterns, ``pipe:``
commands, URLs). Row keys: the path relative to its directory for directory finds, the path as
given for files, lists and manifests, ``shardname/__key__`` for shard samples.

Relative paths in lists and stdin are opened relative to ``root`` (default: the current directory),
never relative to the list file, so that ``find photos | ramtag tag -`` and ``@list.txt`` behave alike.
Relative paths in manifests are opened relative to ``root`` when given, else relative to the manifest's
own folder (the way img2dataset and COCO files are used); their keys stay as written.

With ``image_column``, Parquet and Arrow files (and folders of them, and ``datasets`` ``save_to_disk``
folders) are tables that hold their images (see :mod:`ramtag.data.image_tables`); they are listed in
``InputPlan.tables`` and read by work unit, never here.

:func:`plan_inputs` only lists; :class:`FileDataset` and :class:`ShardDataset` decode. Neither
dataset raises for a bad image: it yields a record whose ``error`` says why.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ramtag.data import storage
from ramtag.data.image_tables import (
    RENAMED_COLUMNS,
    check_path_column,
    image_columns_hint,
    is_table_input,
    merged_schema,
    output_column,
    table_files,
    tables_carried_schema,
)
from ramtag.data.images import PIL_LIMIT, ImageDecodeError, decode_image
from ramtag.data.shard_columns import (
    ShardColumn,
    check_sample_has,
    parse_shard_columns,
    sample_values,
    shard_columns_schema,
)
from ramtag.errors import DataError, UsageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_EXTENSIONS: tuple[str, ...] = (".parquet", ".csv", ".jsonl", ".ndjson")
SHARD_EXTENSIONS: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
# Members of a shard sample tried, in order, as its image.
SHARD_IMAGE_MEMBERS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "image")

Warn = Callable[[str], None]
Transform = Callable[[Any], torch.Tensor]

_BASE_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("error", pa.string()),
]


# ---------------------------------------------------------------------------------------------
# The plan


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


def check_rank(rank: int, world_size: int) -> None:
    """Refuse a rank outside ``[0, world_size)`` (a programming error, not bad input)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")


def shard_split_problem(n_shards: int, world_size: int, workers: int) -> str | None:
    """Report fewer shards than ranks x workers (idle ranks or workers), before a run starts."""
    if n_shards == 0:
        return None
    slots = world_size * max(workers, 1)
    if n_shards >= slots:
        return None
    if n_shards < world_size:
        return (
            f"{n_shards} shard(s) for {world_size} ranks: {world_size - n_shards} rank(s) would get no shard; "
            "use fewer processes or split the shards"
        )
    return (
        f"{n_shards} shard(s) for {world_size} rank(s) x {workers} worker(s): some workers would idle; "
        f"use --workers {max(1, n_shards // world_size)} or more shards"
    )


_UNDECODABLE = "\x00"
"""Prefix of a stored path whose name is not UTF-8 (Arrow strings are UTF-8): the rest is its bytes in hex.
No real path contains NUL, so the prefix cannot be mistaken for one."""


def printable(text: str) -> str:
    """``text`` as valid UTF-8 for keys, sources and messages: bytes that are not UTF-8 (file names from
    another locale, decoded by Python with surrogate escapes) become backslash escapes such as ``\\xe9``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "backslashreplace")


def storable_path(path: str) -> str:
    """A path as an Arrow string that :func:`filesystem_path` turns back into the same file name."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return _UNDECODABLE + os.fsencode(path).hex()


def filesystem_path(stored: str) -> str:
    """The file name a files table stores (see :func:`storable_path`)."""
    return os.fsdecode(bytes.fromhex(stored[1:])) if stored.startswith(_UNDECODABLE) else stored


@dataclass
class _Collector:
    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    extra_tables: list[tuple[int, pa.Table]] = field(default_factory=list)

    def add(self, key: str, source: str, path: str | None, error: str | None = None) -> None:
        self.keys.append(printable(key))
        self.sources.append(printable(source))
        self.paths.append(storable_path(path) if path is not None else None)
        self.errors.append(printable(error) if error is not None else None)


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
    """List what ``inputs`` name, without decoding any image.

    ``keep_columns`` names manifest columns, columns of image tables and, for shards, members, JSON fields
    and ``__key__`` (:mod:`ramtag.data.shard_columns`); every input of those kinds must have them. A column
    named like one of ramtag's own (``key``) is carried under another name (``source_key``), with a warning.

    Missing command-line paths, unreadable lists or manifests, unexpanded or empty patterns and
    keys that two different files would share raise :class:`DataError`; missing files named
    inside lists or manifests become error rows later. Directory problems (unreadable folders,
    symlink loops, broken links) are warnings: passed to ``on_warning`` and kept in the plan.
    """
    if not inputs:
        raise DataError("no inputs given")
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        if on_warning is not None:
            on_warning(message)

    base = Path(root) if root is not None else None
    collector = _Collector()
    shards: list[str] = []
    tables: list[str] = []
    extra_schema: pa.Schema | None = None
    stdin_used = False
    for raw in inputs:
        for item in _expand_pattern(raw):
            if item == "-":
                if stdin_used:
                    raise DataError("'-' (paths on stdin) given more than once")
                stdin_used = True
                stream = stdin if stdin is not None else _default_stdin()
                _add_listed(collector, stream, "-", base, warn)
            elif item.startswith("@"):
                _add_list_file(collector, item[1:], base, warn)
            elif image_column and is_table_input(item):
                tables.extend(table_files(item))
            elif _is_shard(item):
                shards.append(_checked_shard(item))
            elif _has_suffix(item, MANIFEST_EXTENSIONS):
                extra_schema = _add_manifest(collector, item, path_column, keep_columns, base, extra_schema, warn)
            elif storage.is_remote(item):
                _add_remote(collector, item, warn)
            elif os.path.isdir(item):
                _add_directory(collector, item, warn)
            elif os.path.exists(item):
                collector.add(item, item, item)
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
    if keep_columns and extra_schema is None and not shards and not tables:
        raise UsageError(
            "--keep-columns carries manifest columns (or table columns, shard members), but no manifest "
            "(.parquet, .csv, .jsonl), table (--image-column) or shard was given"
        )
    unique_tables = list(dict.fromkeys(tables))
    unique_shards = list(dict.fromkeys(shards))
    if len(unique_shards) < len(shards):
        warn(f"{len(shards) - len(unique_shards)} shard(s) named more than once; each is read once")
    _refuse_shared_shard_names(unique_shards)
    schemas = [extra_schema] if extra_schema is not None else []
    if unique_tables:
        schemas.append(tables_carried_schema(unique_tables, image_column or "", key_column, keep_columns))
    if unique_shards and keep_columns:
        schemas.append(_shard_schema(unique_shards[0], parse_shard_columns(keep_columns)))
    carried = merged_schema(schemas)
    for name in keep_columns:
        if name in RENAMED_COLUMNS:
            warn(f"--keep-columns {name}: written as column {output_column(name)} ({name} is ramtag's row key)")
    files = _drop_repeats(_files_table(collector, carried), warn)
    return InputPlan(files, unique_shards, carried, warnings, unique_tables)


def _shard_schema(url: str, columns: Sequence[ShardColumn]) -> pa.Schema:
    """The shard columns' fields, after checking the first sample of the first shard has each name."""
    try:
        samples = iter_shard_samples(url)
        first = next(samples, None)
        samples.close()
    except Exception:  # an unreadable shard becomes its error row when the run reads it
        first = None
    if first is not None:
        check_sample_has(first, columns, shard_name(url))
    return shard_columns_schema(columns)


def _refuse_shared_shard_names(shards: Sequence[str]) -> None:
    """Row keys start with the shard's file name: two shards with one name would give their samples one key."""
    first: dict[str, str] = {}
    for url in shards:
        name = shard_name(url)
        if name in first:
            raise DataError(
                f"shards {first[name]} and {url} share the name {name!r}, so their row keys would collide; "
                "rename one, or tag them in separate runs"
            )
        first[name] = url


def _default_stdin() -> TextIO:
    import sys

    return sys.stdin


def _has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    lowered = path.lower()
    return any(lowered.endswith(suffix) for suffix in suffixes)


def _is_shard(item: str) -> bool:
    return item.startswith("pipe:") or _has_suffix(item.split("?", 1)[0], SHARD_EXTENSIONS)


def is_shard_input(item: str) -> bool:
    """Whether a command-line input (a path, pattern or ``pipe:`` command) names WebDataset shards."""
    return _is_shard(item)


def _checked_shard(url: str) -> str:
    if url.startswith("pipe:"):
        if not url[5:].strip():
            raise DataError(f"{url!r}: empty pipe command")
        return url
    if storage.is_remote(url):  # one request per bucket, not per shard: a missing shard becomes its error row
        storage.check_bucket_once(url)
        return url
    if "://" in url and not url.startswith("file://"):
        return url
    path = url[len("file://") :] if url.startswith("file://") else url
    if not os.path.isfile(path):
        raise DataError(f"{url}: no such shard")
    return url


def _add_remote(collector: _Collector, url: str, warn: Warn) -> None:
    """An image object, or every image below a prefix (keys relative to it, as for a local folder)."""
    found = 0
    for key, child in storage.list_images(url, IMAGE_EXTENSIONS):
        collector.add(key, child, child)
        found += 1
    if not found:
        warn(f"{url}: no image objects below this prefix ({' '.join(sorted(IMAGE_EXTENSIONS))})")


def _expand_pattern(raw: str) -> list[str]:
    """Expand brace and glob patterns that the shell left alone; refuse ones that match nothing."""
    if raw in ("-",) or raw.startswith("@") or os.path.exists(raw):
        return [raw]
    items = [raw]
    if "{" in raw or "}" in raw:
        import braceexpand

        try:
            items = list(braceexpand.braceexpand(raw))
        except Exception as exc:  # braceexpand raises on unbalanced braces
            raise DataError(f"{raw}: malformed brace pattern ({exc})") from exc
        if not items:
            raise DataError(f"{raw}: pattern expands to nothing")
        # A pipe command may hold braces of its own (awk '{print}'); a path may not.
        unexpanded = [
            item
            for item in items
            if ("{" in item or "}" in item) and not item.startswith("pipe:") and not os.path.exists(item)
        ]
        if unexpanded:
            raise DataError(f"{raw}: pattern was not expanded (check the braces, e.g. shards/{{000000..000009}}.tar)")
    result: list[str] = []
    for item in items:
        if storage.is_remote(item) and storage.has_magic(item):
            matches = storage.glob(item)
            if not matches:
                storage.check_bucket(item, DataError)
                raise DataError(f"{item}: pattern matches no object")
            result.extend(matches)
        elif not item.startswith("pipe:") and "://" not in item and glob.has_magic(item) and not os.path.exists(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"{item}: pattern matches nothing")
            result.extend(matches)
        else:
            result.append(item)
    return result


def _resolve(path: str, base: Path | None) -> str:
    if base is None or os.path.isabs(path) or storage.scheme(path) is not None:  # a URL is never relative
        return path
    return str(base / path)


def _add_listed(collector: _Collector, lines: Iterable[str], origin: str, base: Path | None, warn: Warn) -> None:
    skipped_dirs = 0
    for line in lines:
        path = line.rstrip("\r\n")
        if not path.strip():
            continue
        resolved = _resolve(path, base)
        if os.path.isdir(resolved):
            skipped_dirs += 1
            continue
        collector.add(path, resolved, resolved)
    if skipped_dirs:
        warn(f"{origin}: skipped {skipped_dirs} director{'y' if skipped_dirs == 1 else 'ies'} (lists name files)")


def _add_list_file(collector: _Collector, list_path: str, base: Path | None, warn: Warn) -> None:
    if storage.is_remote(list_path):
        try:
            lines = list(storage.iter_lines(list_path))
        except UnicodeDecodeError as exc:
            raise DataError(f"@{list_path}: cannot read list ({exc})") from exc
        except DataError as exc:
            raise DataError(f"@{exc}") from exc
        _add_listed(collector, lines, f"@{list_path}", base, warn)
        return
    try:
        with open(list_path, encoding="utf-8") as handle:
            _add_listed(collector, handle, f"@{list_path}", base, warn)
    except FileNotFoundError as exc:
        raise DataError(f"@{list_path}: no such list file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"@{list_path}: cannot read list ({exc})") from exc


def _add_directory(collector: _Collector, top: str, warn: Warn) -> None:
    found = 0
    for key, path in walk_images(top, warn):
        collector.add(key, path, path)
        found += 1
    if not found:
        warn(f"{top}: no image files in this folder or below ({' '.join(sorted(IMAGE_EXTENSIONS))})")


def _sorted_entries(directory: str, warn: Warn) -> Iterator[tuple[os.DirEntry, bool]]:
    """A directory's entries with whether each is a directory, ordered by name, a directory's as ``name/``:
    walking depth first in this order yields the keys below a folder in sorted order, one folder in memory."""
    try:
        with os.scandir(directory) as entries:
            listing = []
            for entry in entries:
                # is_dir uses the directory listing's type field: no stat call per file.
                try:
                    is_dir = entry.is_dir()
                except OSError:  # a link to itself (ELOOP)
                    is_dir = False
                listing.append((entry.name + "/" if is_dir else entry.name, entry, is_dir))
    except OSError as exc:
        warn(f"{directory}: cannot read directory ({exc.strerror or exc}); skipped")
        return iter(())
    listing.sort(key=lambda item: item[0])
    return iter([(entry, is_dir) for _, entry, is_dir in listing])


def walk_images(top: str, warn: Warn) -> Iterator[tuple[str, str]]:
    """``(key, path)`` of every image file below ``top``, in key order, streaming (symlink loops skipped)."""
    top_stat = os.stat(top)
    # Each stack entry: the entries still to visit of a directory, its key prefix, and the (dev, inode)s
    # of it and its ancestors.
    stack = [(_sorted_entries(top, warn), "", frozenset({(top_stat.st_dev, top_stat.st_ino)}))]
    while stack:
        entries, prefix, ancestors = stack[-1]
        item = next(entries, None)
        if item is None:
            stack.pop()
            continue
        entry, is_dir = item
        key = prefix + entry.name
        if is_dir:
            try:
                info = entry.stat()
            except OSError as exc:
                warn(f"{entry.path}: cannot read directory ({exc.strerror or exc}); skipped")
                continue
            identity = (info.st_dev, info.st_ino)
            if identity in ancestors:
                warn(f"{entry.path}: symlink loop; skipped")
                continue
            stack.append((_sorted_entries(entry.path, warn), key + "/", ancestors | {identity}))
        elif _is_file(entry):
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                yield key, entry.path
        elif entry.is_symlink() and not os.path.exists(entry.path):
            warn(f"{entry.path}: broken or looping symlink; skipped")


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _read_manifest(path: str, columns: list[str]) -> pa.Table:
    lowered = path.lower()
    source: Any = storage.open_random_access(path) if storage.is_remote(path) else path
    if lowered.endswith(".parquet"):
        import pyarrow.parquet as pq

        schema = pq.read_schema(source)
        _require_columns(path, columns, schema.names, image_columns_hint(schema))
        check_path_column(path, columns[0], schema.field(columns[0]).type)
        return pq.read_table(source, columns=columns)
    if lowered.endswith(".csv"):
        import pyarrow.csv as pacsv

        # Paths stay strings even when they look like numbers (e.g. 0001).
        table = pacsv.read_csv(
            source,
            convert_options=pacsv.ConvertOptions(column_types={columns[0]: pa.string()}, strings_can_be_null=True),
        )
    else:
        import pyarrow.json as pajson

        table = pajson.read_json(source)
    _require_columns(path, columns, table.column_names)
    return table.select(columns)


def _require_columns(path: str, wanted: list[str], present: list[str], hint: str = "") -> None:
    missing = [name for name in wanted if name not in present]
    if missing:
        raise DataError(f"{path}: no column(s) {', '.join(missing)} (columns: {', '.join(present)}){hint}")


def _add_manifest(
    collector: _Collector,
    manifest: str,
    path_column: str,
    keep_columns: Sequence[str],
    base: Path | None,
    extra_schema: pa.Schema | None,
    warn: Warn | None = None,
) -> pa.Schema:
    if storage.is_remote(manifest):
        if storage.file_type(manifest) != "file":
            storage.check_bucket(manifest, DataError)
            raise DataError(f"{manifest}: no such manifest")
    elif not os.path.isfile(manifest):
        raise DataError(f"{manifest}: no such manifest")
    reserved = {"key", "source", "tags", "error", "scores"} - set(RENAMED_COLUMNS)
    clashes = sorted(reserved.intersection(keep_columns))
    if clashes:
        raise DataError(f"--keep-columns {', '.join(clashes)}: these names are output columns of ramtag")
    renamed = sorted(name for name in keep_columns if output_column(name) in keep_columns and name in RENAMED_COLUMNS)
    if renamed:
        raise UsageError(f"--keep-columns {renamed[0]} is written as {output_column(renamed[0])}, which is kept too")
    beside = base is None and "://" not in manifest  # (a URL's folder is not a Path)
    if beside:  # relative paths name files beside the manifest
        base = Path(manifest).parent
    columns = [path_column] + [name for name in keep_columns if name != path_column]
    try:
        table = _read_manifest(manifest, columns)
    except (DataError, UsageError):
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{manifest}: cannot read manifest ({_first_line(exc)})") from exc
    extra = table.select(list(keep_columns)).rename_columns([output_column(name) for name in keep_columns])
    if extra_schema is None:
        extra_schema = extra.schema.remove_metadata()
    else:
        try:
            extra = extra.cast(extra_schema)
        except Exception as exc:
            raise DataError(
                f"{manifest}: --keep-columns types differ from an earlier manifest ({_first_line(exc)})"
            ) from exc
    paths = table[path_column].cast(pa.string()).to_pylist()
    if beside and warn is not None:
        _warn_when_paths_look_cwd_relative(manifest, paths, base, warn)
    start = len(collector.keys)
    for row, path in enumerate(paths, start=1):
        if path is None or not path.strip():
            collector.add(f"{manifest}:{row}", manifest, None, f"empty path in manifest row {row}")
        else:
            collector.add(path, _resolve(path, base), _resolve(path, base))
    collector.extra_tables.append((start, extra))
    return extra_schema


def _warn_when_paths_look_cwd_relative(manifest: str, paths: Sequence[str | None], base: Path, warn: Warn) -> None:
    """One stat, not one per row: the first relative path missing beside the manifest but present from the
    current directory means the manifest was written for the old rule; say how to get it."""
    first = next((path for path in paths if path and path.strip() and not os.path.isabs(path)), None)
    if first is None or os.path.exists(base / first) or not os.path.exists(first):
        return
    warn(
        f"{manifest}: relative paths are read from the manifest's folder ({base}), where {first} is missing; "
        "it exists from the current directory: pass --root . to read them from there"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _files_table(collector: _Collector, extra_schema: pa.Schema) -> pa.Table:
    n_rows = len(collector.keys)
    columns: list[pa.Array] = [
        pa.array(collector.keys, pa.string()),
        pa.array(collector.sources, pa.string()),
        pa.array(collector.paths, pa.string()),
        pa.array(collector.errors, pa.string()),
    ]
    fields = list(_BASE_FIELDS)
    for extra_field in extra_schema:
        pieces: list[pa.Array] = []
        cursor = 0
        for start, table in collector.extra_tables:
            if start > cursor:
                pieces.append(pa.nulls(start - cursor, extra_field.type))
            if extra_field.name not in table.column_names:  # a column that only tables or shards carry
                pieces.append(pa.nulls(table.num_rows, extra_field.type))
                cursor = start + table.num_rows
                continue
            chunk = table[extra_field.name].combine_chunks()
            pieces.append(chunk.cast(extra_field.type))
            cursor = start + table.num_rows
        if n_rows > cursor:
            pieces.append(pa.nulls(n_rows - cursor, extra_field.type))
        columns.append(pa.concat_arrays(pieces) if pieces else pa.nulls(0, extra_field.type))
        fields.append(pa.field(extra_field.name, extra_field.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _drop_repeats(files: pa.Table, warn: Warn) -> pa.Table:
    """Drop exact repeats (same key, same path) with a warning; refuse one key for two files."""
    if files.num_rows < 2 or pc.count_distinct(files["key"]).as_py() == files.num_rows:
        return files
    keys = files["key"].to_pylist()
    paths = files["path"].to_pylist()
    first_path: dict[str, str | None] = {}
    keep: list[int] = []
    repeats = 0
    for index, (key, path) in enumerate(zip(keys, paths)):
        if key not in first_path:
            first_path[key] = path
            keep.append(index)
        elif first_path[key] == path:
            repeats += 1
        else:
            raise DataError(
                f"key {key!r} would name two different files ({first_path[key]} and {path}); "
                "pass their common parent folder instead, or tag them in separate runs"
            )
    warn(f"{repeats} input(s) named more than once; each is tagged once")
    return files.take(pa.array(keep, pa.int64()))


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class Record:
    """One input item after decoding: ``image`` is set, or ``error`` says why not."""

    key: str
    source: str
    image: torch.Tensor | None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    unit: int = -1
    """The work unit the record belongs to (see :mod:`ramtag.data.units`), -1 outside one."""


def _decode(
    data: Any, transform: Transform, max_pixels: int | None, draft_size: int | None
) -> tuple[torch.Tensor | None, str | None]:
    try:
        image = decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
        return transform(image), None
    except ImageDecodeError as exc:
        return None, exc.reason
    except Exception as exc:  # a bad image must never end the run
        return None, f"cannot decode: {_first_line(exc)}"


class FileDataset(Dataset):
    """Map-style dataset over a files table (usually ``plan.files_for_rank(...)``)."""

    def __init__(
        self,
        files: pa.Table,
        transform: Transform,
        *,
        max_pixels: int | None = PIL_LIMIT,
        draft_size: int | None = None,
    ) -> None:
        self.files = files.combine_chunks()
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self._extra_names = [name for name in files.column_names if name not in {"key", "source", "path", "error"}]

    def __len__(self) -> int:
        return self.files.num_rows

    def __getitem__(self, index: int) -> Record:
        row = {name: self.files[name][index].as_py() for name in ("key", "source", "path", "error")}
        extra = {name: self.files[name][index].as_py() for name in self._extra_names}
        if row["error"] is not None or row["path"] is None:
            return Record(row["key"], row["source"], None, row["error"] or "no path", extra)
        path = filesystem_path(row["path"])
        if storage.scheme(path) is not None and not path.startswith("file://"):
            data, error = storage.read_listed_image(path)
            if error is not None:
                return Record(row["key"], row["source"], None, error, extra)
        else:
            data = path
        image, error = _decode(data, self.transform, self.max_pixels, self.draft_size)
        return Record(row["key"], row["source"], image, error, extra)


def shard_name(url: str) -> str:
    """The name a shard contributes to row keys: its file name (of the tar a pipe command reads)."""
    if url.startswith("pipe:"):
        tokens = url[5:].split()
        tars = [token for token in tokens if _has_suffix(token.split("?", 1)[0], SHARD_EXTENSIONS)]
        url = tars[-1] if tars else (tokens[-1] if tokens else url)
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or url


_PIPE_STATUS = re.compile(r": exit (\d+) \(")


def _shard_error(exc: BaseException) -> str:
    status = _PIPE_STATUS.search(str(exc)) if isinstance(exc, OSError) else None
    if status is not None:  # webdataset's Pipe reports the whole Popen call
        return f"command exited with status {status.group(1)}"
    return _first_line(exc)


LINK_MEMBERS = "__links__"
"""Sample entry listing the suffixes of members that are symbolic or hard links (their bytes are not read)."""


def iter_shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Yield raw webdataset samples (``__key__`` plus member bytes) of one shard, in order.

    Errors propagate; :class:`ShardDataset` turns them into one error row for the shard.
    """
    import webdataset

    from ramtag.data.pipes import open_pipe

    if url.startswith("pipe:"):
        stream = open_pipe(url[len("pipe:"):])
    else:
        stream = storage.open_input(url) if storage.is_remote(url) else webdataset.gopen(url, "rb")
    try:
        current: dict[str, Any] | None = None
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not (member.isreg() or member.islnk() or member.issym()):
                    continue
                prefix, suffix = _split_member_name(member.name)
                if prefix is None:
                    continue
                if current is None or current["__key__"] != prefix:
                    if current is not None:
                        yield current
                    current = {"__key__": prefix}
                if member.isreg():
                    handle = archive.extractfile(member)
                    current[suffix.lower()] = handle.read() if handle is not None else b""
                else:  # a stream cannot go back to a link's target; the sample records it instead of vanishing
                    current.setdefault(LINK_MEMBERS, []).append(suffix.lower())
                archive.members = []  # streaming: do not keep every member header in memory
            if current is not None:  # its members all arrived whole
                yield current
            # tarfile ends quietly when the data stops at a member boundary; a whole archive ends with zero
            # blocks, which tarfile reads past (so its stream is ahead of its offset). A cut-off download is not.
            if archive.fileobj.tell() == archive.offset:
                raise tarfile.ReadError("the archive ends without its end-of-archive blocks (cut off?)")
    finally:
        stream.close()


def _split_member_name(name: str) -> tuple[str | None, str]:
    """webdataset's convention: the key is everything before the first dot of the last component."""
    directory, _, base = name.rpartition("/")
    if base.startswith("__") and base.endswith("__"):
        return None, ""
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{directory}/{stem}" if directory else stem), suffix


def _sample_image(sample: Mapping[str, Any]) -> bytes | None:
    for member in SHARD_IMAGE_MEMBERS:
        if member in sample:
            return sample[member]
    return None


class ShardDataset(IterableDataset):
    """Iterable dataset over WebDataset shards, split by rank and by DataLoader worker.

    Rank ``r`` of ``world_size`` reads ``shards[r::world_size]``; within it, worker ``w`` of ``n``
    reads every ``n``-th of those. A shard that cannot be opened or breaks mid-way yields one
    error row keyed ``shardname/``; samples without an image yield an error row of their own.
    """

    def __init__(
        self,
        shards: Sequence[str],
        transform: Transform,
        *,
        rank: int = 0,
        world_size: int = 1,
        skip_keys: Iterable[str] = (),
        max_pixels: int | None = PIL_LIMIT,
        draft_size: int | None = None,
        columns: Sequence[ShardColumn] = (),
    ) -> None:
        check_rank(rank, world_size)
        self.columns = list(columns)
        """Carried members, JSON fields or the sample key (:mod:`ramtag.data.shard_columns`)."""
        self.shards = list(shards)
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.skip_keys = frozenset(skip_keys)
        self.max_pixels = max_pixels
        self.draft_size = draft_size

    def assigned_shards(self) -> list[str]:
        """The shards this rank and (inside a DataLoader worker) this worker read."""
        mine = self.shards[self.rank :: self.world_size]
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            mine = mine[info.id :: info.num_workers]
        return mine

    def __iter__(self) -> Iterator[Record]:
        for url in self.assigned_shards():
            yield from self.read_shard(url)

    def read_shard(self, url: str) -> Iterator[Record]:
        """The records of one shard (samples in ``skip_keys`` left out), ending with its error row if it broke."""
        name = printable(shard_name(url))
        source = printable(url)
        count = 0
        try:
            seen: dict[str, int] = {}
            for sample in iter_shard_samples(url):
                count += 1
                key = printable(f"{name}/{sample['__key__']}")
                repeats = seen[key] = seen.get(key, 0) + 1
                if repeats > 1:  # members of a sample must be consecutive; a later group is recorded, not merged
                    key = f"{key} (repeat {repeats})"
                    if key not in self.skip_keys:
                        yield Record(
                            key,
                            source,
                            None,
                            "key repeats an earlier sample of the shard (members of a sample must be consecutive)",
                        )
                    continue
                if key in self.skip_keys:
                    continue
                data = _sample_image(sample)
                if data is None:
                    members = ", ".join(sorted(k for k in sample if k not in ("__key__", LINK_MEMBERS)))
                    linked = ", ".join(m for m in sample.get(LINK_MEMBERS, []) if m in SHARD_IMAGE_MEMBERS)
                    reason = (f"image member is a link ({linked}); links in shards are not followed" if linked
                              else f"no image in sample (members: {members})")
                    yield Record(key, source, None, printable(reason), sample_values(sample, self.columns))
                    continue
                image, error = _decode(data, self.transform, self.max_pixels, self.draft_size)
                yield Record(key, source, image, error, sample_values(sample, self.columns))
        except Exception as exc:  # tar, pipe and network errors: record them, go on to the next shard
            key = f"{name}/"
            if key not in self.skip_keys:
                where = f" after {count} sample(s)" if count else ""
                yield Record(key, source, None, f"cannot read shard{where}: {_shard_error(exc)}")


# ---------------------------------------------------------------------------------------------
# Batching


@dataclass
class Batch:
    """Decoded images of one batch, with the failed items kept aside (never dropped)."""

    images: torch.Tensor | None
    keys: list[str]
    sources: list[str]
    extra: dict[str, list[Any]]
    failed_keys: list[str]
    failed_sources: list[str]
    failed_errors: list[str]
    failed_extra: dict[str, list[Any]]
    units: list[int] = field(default_factory=list)
    failed_units: list[int] = field(default_factory=list)
    ended: list[Any] = field(default_factory=list)
    """Work units whose last record came before the end of this batch (:class:`ramtag.data.units.UnitEnd`)."""

    def __len__(self) -> int:
        return len(self.keys) + len(self.failed_keys)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def _columns(records: Sequence[Record], names: Sequence[str]) -> dict[str, list[Any]]:
    return {name: [record.extra.get(name) for record in records] for name in names}


def collate_records(records: Sequence[Record]) -> Batch:
    """DataLoader ``collate_fn``: stack good images, keep failed records aside."""
    good = [record for record in records if record.image is not None]
    bad = [record for record in records if record.image is None]
    names = sorted({name for record in records for name in record.extra})
    return Batch(
        images=torch.stack([record.image for record in good]) if good else None,
        keys=[record.key for record in good],
        sources=[record.source for record in good],
        extra=_columns(good, names),
        failed_keys=[record.key for record in bad],
        failed_sources=[record.source for record in bad],
        failed_errors=[record.error or "cannot decode" for record in bad],
        failed_extra=_columns(bad, names),
        units=[record.unit for record in good],
        failed_units=[record.unit for record in bad],
    )
