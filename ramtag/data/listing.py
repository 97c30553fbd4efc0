"""The listing stage: what folders, single files, ``@list.txt``, ``-`` (paths on stdin), manifests (``.parquet``,
``.csv``, ``.jsonl``) and object-storage prefixes name, as rows of a files table (key, source, path, error and
the carried manifest columns), streamed in record batches (manifests are read by :mod:`ramtag.data.manifests`).
Nothing here opens an image.

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
from pathlib import Path

import pyarrow as pa

from ramtag.data import storage
from ramtag.errors import DataError

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


class Listing:
    """The rows listed so far, handed to ``emit`` as record batches of ``schema`` (key, source, path, error, then
    the carried columns) of at most ``batch_rows`` rows: a listing of any length holds one batch in memory."""

    def __init__(self, schema: pa.Schema, emit: Callable[[pa.RecordBatch], None], batch_rows: int = 16_384):
        self.schema = schema
        self.rows = 0
        self._emit = emit
        self._batch_rows = batch_rows
        self._pending: tuple[list[str], list[str], list[str | None], list[str | None]] = ([], [], [], [])

    def add(self, key: str, source: str, path: str | None, error: str | None = None) -> None:
        keys, sources, paths, errors = self._pending
        keys.append(printable(key))
        sources.append(printable(source))
        paths.append(storable_path(path) if path is not None else None)
        errors.append(printable(error) if error is not None else None)
        if len(keys) >= self._batch_rows:
            self.flush()

    def add_batch(self, batch: pa.RecordBatch) -> None:
        """Rows already in the listing's schema (a manifest's batch), after those added one by one."""
        self.flush()
        if batch.num_rows:
            self.rows += batch.num_rows
            self._emit(batch)

    def flush(self) -> None:
        keys = self._pending[0]
        if not keys:
            return
        columns = [pa.array(values, pa.string()) for values in self._pending]
        columns += [pa.nulls(len(keys), carried.type) for carried in list(self.schema)[len(BASE_COLUMNS):]]
        self._pending = ([], [], [], [])
        self.rows += len(keys)
        self._emit(pa.record_batch(columns, schema=self.schema))


def listing_schema(carried: pa.Schema) -> pa.Schema:
    """The listing's columns: the four of every row, then the carried ones."""
    return pa.schema(_BASE_FIELDS + [pa.field(carried_field.name, carried_field.type) for carried_field in carried])


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
            add_listed(collector, storage.iter_lines(list_path), f"@{list_path}", base, warn)
        except UnicodeDecodeError as exc:
            raise DataError(f"@{list_path}: cannot read list ({exc})") from exc
        except DataError as exc:
            raise DataError(f"@{exc}") from exc
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
