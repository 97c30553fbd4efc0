"""The listing stage: what folders, single files, ``@list.txt``, ``-`` (paths on stdin), manifests (``.parquet``,
``.csv``, ``.jsonl``) and object-storage prefixes name, as rows of a files table (key, source, path, error and
the carried manifest columns). Nothing here opens an image.

Row keys: the path relative to its directory for directory finds, the path as given for files, lists and
manifests. Relative paths in lists and stdin are opened relative to ``root`` (default: the current directory),
never relative to the list file, so that ``find photos | ramtag tag -`` and ``@list.txt`` behave alike.
Relative paths in manifests are opened relative to ``root`` when given, else relative to the manifest's own
folder (the way img2dataset and COCO files are used); their keys stay as written.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ramtag.data import storage
from ramtag.data.image_tables import RENAMED_COLUMNS, check_path_column, image_columns_hint, output_column
from ramtag.errors import DataError, UsageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_EXTENSIONS: tuple[str, ...] = (".parquet", ".csv", ".jsonl", ".ndjson")

Warn = Callable[[str], None]

BASE_COLUMNS: tuple[str, ...] = ("key", "source", "path", "error")
_BASE_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("error", pa.string()),
]


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
class Listing:
    """The rows listed so far, column by column (Arrow builds the table once at the end), with the carried
    manifest columns as (first row, table) pieces."""

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


def has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    lowered = path.lower()
    return any(lowered.endswith(suffix) for suffix in suffixes)


def add_remote(collector: Listing, url: str, warn: Warn) -> None:
    """An image object, or every image below a prefix (keys relative to it, as for a local folder)."""
    found = 0
    for key, child in storage.list_images(url, IMAGE_EXTENSIONS):
        collector.add(key, child, child)
        found += 1
    if not found:
        warn(f"{url}: no image objects below this prefix ({' '.join(sorted(IMAGE_EXTENSIONS))})")


def expand_pattern(raw: str) -> list[str]:
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


def resolve(path: str, base: Path | None) -> str:
    if base is None or os.path.isabs(path) or storage.scheme(path) is not None:  # a URL is never relative
        return path
    return str(base / path)


def add_listed(collector: Listing, lines: Iterable[str], origin: str, base: Path | None, warn: Warn) -> None:
    skipped_dirs = 0
    for line in lines:
        path = line.rstrip("\r\n")
        if not path.strip():
            continue
        resolved = resolve(path, base)
        if os.path.isdir(resolved):
            skipped_dirs += 1
            continue
        collector.add(path, resolved, resolved)
    if skipped_dirs:
        warn(f"{origin}: skipped {skipped_dirs} director{'y' if skipped_dirs == 1 else 'ies'} (lists name files)")


def add_list_file(collector: Listing, list_path: str, base: Path | None, warn: Warn) -> None:
    if storage.is_remote(list_path):
        try:
            lines = list(storage.iter_lines(list_path))
        except UnicodeDecodeError as exc:
            raise DataError(f"@{list_path}: cannot read list ({exc})") from exc
        except DataError as exc:
            raise DataError(f"@{exc}") from exc
        add_listed(collector, lines, f"@{list_path}", base, warn)
        return
    try:
        with open(list_path, encoding="utf-8") as handle:
            add_listed(collector, handle, f"@{list_path}", base, warn)
    except FileNotFoundError as exc:
        raise DataError(f"@{list_path}: no such list file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"@{list_path}: cannot read list ({exc})") from exc


def add_directory(collector: Listing, top: str, warn: Warn) -> None:
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


def add_manifest(
    collector: Listing,
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
        raise DataError(f"{manifest}: cannot read manifest ({first_line(exc)})") from exc
    extra = table.select(list(keep_columns)).rename_columns([output_column(name) for name in keep_columns])
    if extra_schema is None:
        extra_schema = extra.schema.remove_metadata()
    else:
        try:
            extra = extra.cast(extra_schema)
        except Exception as exc:
            raise DataError(
                f"{manifest}: --keep-columns types differ from an earlier manifest ({first_line(exc)})"
            ) from exc
    paths = table[path_column].cast(pa.string()).to_pylist()
    if beside and warn is not None:
        _warn_when_paths_look_cwd_relative(manifest, paths, base, warn)
    start = len(collector.keys)
    for row, path in enumerate(paths, start=1):
        if path is None or not path.strip():
            collector.add(f"{manifest}:{row}", manifest, None, f"empty path in manifest row {row}")
        else:
            collector.add(path, resolve(path, base), resolve(path, base))
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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' run to paragraphs), or its type's name."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def files_table(collector: Listing, extra_schema: pa.Schema) -> pa.Table:
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


def drop_repeats(files: pa.Table, warn: Warn) -> pa.Table:
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
