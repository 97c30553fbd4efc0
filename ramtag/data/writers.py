"""Tag tables: Parquet, JSONL, JSONL on stdout, or a partitioned Parquet dataset.

Lifecycle of a run that writes to ``OUT`` (every path below is beside it):

1. rank 0: :func:`prepare_output` refuses an existing output unless resuming or overwriting,
   creates the hidden work directory ``.OUT.parts/`` and starts a new *run* in it;
2. every rank (after a barrier): :func:`attach_output`, then ``layout.finished_keys()`` for resume
   (the same set on every rank: only parts of earlier runs count), then a :class:`TagTableWriter`;
3. each writer turns batches into Arrow in a background thread and writes *part files*: each is
   a complete Parquet file, written under a temporary name and renamed when closed, so a killed
   run leaves only whole parts (at most ``part_seconds`` of work is lost);
4. rank 0, after a barrier: :func:`finalize_output` merges earlier output (when resuming) and all
   parts, keeps one row per key (a good row over an error row, else the newest), writes the
   final file aside and renames it into place, then removes the work directory.

Row order in the final table follows the parts (run, rank, chunk); sort by ``key`` for a
canonical order. Output written to stdout is streamed directly and cannot be resumed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ramtag.atomic import atomic_path, write_json
from ramtag.errors import OutputError, ReaderGone, UsageError
from ramtag.messages import listed
from ramtag.selection import Selection

OutputKind = Literal["parquet", "jsonl", "stdout", "dataset"]

METADATA_KEY = b"ramtag"
RUN_FILE = "run.json"
TAG_TYPE = pa.list_(pa.struct([pa.field("label", pa.string()), pa.field("score", pa.float32())]))
SCORES_TYPE = pa.list_(pa.float32())
_PART_RE = re.compile(r"^part-(\d+)-r(\d+)-c(\d+)\.parquet$")
_DATASET_METADATA_FILES = ("_common_metadata", "_metadata")
_RESERVED = ("key", "source", "tags", "error", "scores")


# ---------------------------------------------------------------------------------------------
# Schema and batches


def table_schema(extra_schema: pa.Schema | None = None, all_scores: bool = False) -> pa.Schema:
    """Columns of a tag table: key, source, tags, error, [scores], then carried columns."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("tags", TAG_TYPE),
        pa.field("error", pa.string()),
    ]
    if all_scores:
        fields.append(pa.field("scores", SCORES_TYPE))
    for extra in extra_schema or []:
        if extra.name in _RESERVED:
            raise UsageError(f"carried column {extra.name!r} clashes with an output column")
        fields.append(pa.field(extra.name, extra.type))
    return pa.schema(fields)


@dataclass
class TagBatch:
    """Rows to write. Tags are flattened like :class:`~ramtag.selection.Selection`."""

    keys: Sequence[str]
    sources: Sequence[str]
    errors: Sequence[str | None]
    tag_counts: np.ndarray
    tag_labels: np.ndarray
    tag_scores: np.ndarray
    scores: np.ndarray | None = None
    """``[N, C]`` scores in vocabulary order (written with ``all_scores``; ignored for error rows)."""
    extra: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_selection(
        cls,
        keys: Sequence[str],
        sources: Sequence[str],
        selection: Selection,
        scores: Any | None = None,
        extra: Mapping[str, Sequence[Any]] | None = None,
    ) -> TagBatch:
        """Rows of images that were scored."""
        if len(selection) != len(keys):
            raise ValueError(f"{len(selection)} selections for {len(keys)} keys")
        return cls(
            keys=list(keys),
            sources=list(sources),
            errors=[None] * len(keys),
            tag_counts=np.asarray(selection.counts, dtype=np.int64),
            tag_labels=np.asarray(selection.labels, dtype=np.int64),
            tag_scores=np.asarray(selection.scores, dtype=np.float32),
            scores=None if scores is None else np.asarray(scores, dtype=np.float32),
            extra=dict(extra or {}),
        )

    @classmethod
    def from_failures(
        cls,
        keys: Sequence[str],
        sources: Sequence[str],
        errors: Sequence[str],
        extra: Mapping[str, Sequence[Any]] | None = None,
    ) -> TagBatch:
        """Rows of inputs that could not be tagged (each ``error`` a one-line reason)."""
        n_rows = len(keys)
        return cls(
            keys=list(keys),
            sources=list(sources),
            errors=list(errors),
            tag_counts=np.zeros(n_rows, dtype=np.int64),
            tag_labels=np.zeros(0, dtype=np.int64),
            tag_scores=np.zeros(0, dtype=np.float32),
            extra=dict(extra or {}),
        )


def _offsets(counts: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())


def batch_to_arrow(batch: TagBatch, labels: pa.Array, schema: pa.Schema) -> pa.RecordBatch:
    """Build one Arrow record batch; label names come from ``labels`` by index (vectorised)."""
    n_rows = len(batch)
    error_mask = np.array([error is not None for error in batch.errors], dtype=bool)
    tag_values = pa.StructArray.from_arrays(
        [labels.take(pa.array(batch.tag_labels, pa.int64())), pa.array(batch.tag_scores, pa.float32())],
        fields=list(TAG_TYPE.value_type),
    )
    columns: dict[str, pa.Array] = {
        "key": pa.array(batch.keys, pa.string()),
        "source": pa.array(batch.sources, pa.string()),
        "tags": pa.ListArray.from_arrays(_offsets(batch.tag_counts), tag_values, type=TAG_TYPE),
        "error": pa.array(batch.errors, pa.string()),
    }
    if "scores" in schema.names:
        if batch.scores is None:
            columns["scores"] = pa.nulls(n_rows, SCORES_TYPE)
        else:
            matrix = np.asarray(batch.scores, dtype=np.float32)
            counts = np.where(error_mask, 0, matrix.shape[1])
            values = pa.array(matrix[~error_mask].reshape(-1), pa.float32())
            columns["scores"] = pa.ListArray.from_arrays(
                _offsets(counts), values, type=SCORES_TYPE, mask=pa.array(error_mask)
            )
    for extra_field in schema:
        if extra_field.name in columns:
            continue
        values = batch.extra.get(extra_field.name)
        columns[extra_field.name] = (
            pa.nulls(n_rows, extra_field.type) if values is None else pa.array(list(values), extra_field.type)
        )
    return pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)


def _json_floats(values: np.ndarray) -> list[str]:
    """float32 values as JSON numbers, each with the fewest significant digits (up to 9) that read back exactly."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    doubles = values.astype(np.float64)
    digits = np.full(values.shape, 9, dtype=np.int64)  # 9 always reads back exactly
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        magnitude = np.floor(np.log10(np.abs(doubles)))
        for candidate in range(8, 0, -1):  # vectorised rounding decides; formatting happens once
            scale = 10.0 ** (candidate - 1 - magnitude)
            exact = (np.round(doubles * scale) / scale).astype(np.float32) == values
            digits[exact] = candidate
    digits[doubles == 0] = 1
    texts = ["%.*g" % pair for pair in zip(digits.tolist(), doubles.tolist())]
    for index in np.flatnonzero(~finite):
        texts[index] = "null"  # JSON has no NaN or infinity
    return texts


def _list_json(array: pa.ListArray, element: Any) -> list[str]:
    """Per row, the JSON text of a list column; ``element(start, stop)`` renders its items."""
    offsets = array.offsets.to_numpy()
    offsets = offsets - offsets[0]
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [
        element(int(offsets[row]), int(offsets[row + 1])) if valid[row] else "null" for row in range(len(array))
    ]


def rows_to_jsonl(table: pa.Table | pa.RecordBatch) -> str:
    """JSON lines for a tag table, columns in table order; float32 scores in short exact form."""
    if isinstance(table, pa.Table):
        table = (
            table.combine_chunks().to_batches()[0]
            if table.num_rows
            else pa.RecordBatch.from_pylist([], schema=table.schema)
        )
    rendered: dict[str, list[str]] = {}
    for name in table.schema.names:
        column = table.column(name)
        if name == "tags":
            tags = column.flatten()
            labels = [json.dumps(label, ensure_ascii=False) for label in tags.field("label").to_pylist()]
            scores = _json_floats(tags.field("score").to_numpy(zero_copy_only=False))
            rendered[name] = _list_json(
                column,
                lambda start, stop: "["
                + ",".join(f'{{"label":{labels[i]},"score":{scores[i]}}}' for i in range(start, stop))
                + "]",
            )
        elif name == "scores":
            values = _json_floats(column.flatten().to_numpy(zero_copy_only=False))
            rendered[name] = _list_json(column, lambda start, stop: "[" + ",".join(values[start:stop]) + "]")
        else:
            rendered[name] = [json.dumps(value, ensure_ascii=False, default=str) for value in column.to_pylist()]
    keys = [json.dumps(name, ensure_ascii=False) + ":" for name in table.schema.names]
    columns = [rendered[name] for name in table.schema.names]
    return "".join(
        "{" + ",".join(key + values[row] for key, values in zip(keys, columns)) + "}\n" for row in range(table.num_rows)
    )


# ---------------------------------------------------------------------------------------------
# Where things go


def output_kind(output: str | os.PathLike) -> OutputKind:
    """Output format from the path: ``-``, a directory (existing, or ending in ``/``), or extension."""
    text = os.fspath(output)
    if text == "-":
        return "stdout"
    if text.endswith(("/", os.sep)) or os.path.isdir(text):
        return "dataset"
    lowered = text.lower()
    if lowered.endswith((".parquet", ".pq")):
        return "parquet"
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise UsageError(
        f"-o {text}: cannot tell the output format; use a .parquet or .jsonl file, a directory "
        "(ending in /) for a partitioned Parquet dataset, or - for JSON lines on stdout"
    )


@dataclass(frozen=True)
class OutputLayout:
    """Where a run writes: the final output, its work directory, and this run's number."""

    output: Path
    kind: OutputKind
    work_dir: Path
    run: int
    extends_output: bool
    """Whether the finished output that existed when the work began is part of the result."""

    @property
    def meta_path(self) -> Path:
        """The JSONL sidecar holding the table metadata."""
        return self.output.with_name(self.output.name + ".meta.json")

    def part_files(self, *, before_run: int | None = None) -> list[Path]:
        """Finished part files, ordered by (run, rank, chunk); optionally only earlier runs'."""
        return _part_files(self.work_dir, before_run)

    def earlier_output(self) -> Path | None:
        """The finished output that a resumed run extends, if there is one."""
        return self.output if self.extends_output and self.output.exists() else None

    def finished_keys(self, *, retry_errors: bool = False) -> set[str]:
        """Keys already written by earlier runs (and in the earlier output when resuming).

        With ``retry_errors`` the keys of error rows are left out, so those inputs are tried again.
        Every rank gets the same set: parts this run writes are not counted.
        """
        keys: set[str] = set()
        for table in _read_key_tables(self._sources(before_run=self.run)):
            if retry_errors:
                table = table.filter(pc.is_null(table["error"]))
            keys.update(table["key"].to_pylist())
        return keys

    def _sources(self, before_run: int | None = None) -> list[Path]:
        earlier = self.earlier_output()
        sources: list[Path] = []
        if earlier is not None:
            sources.extend(_dataset_files(earlier) if self.kind == "dataset" else [earlier])
        return sources + self.part_files(before_run=before_run)


def _work_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.parts")


def _part_files(work_dir: Path, before_run: int | None = None) -> list[Path]:
    if not work_dir.is_dir():
        return []
    found = []
    for path in work_dir.iterdir():
        match = _PART_RE.match(path.name)
        if match and (before_run is None or int(match.group(1)) < before_run):
            found.append((tuple(int(group) for group in match.groups()), path))
    return [path for _, path in sorted(found)]


def _dataset_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.glob("*.parquet") if not path.name.startswith(("_", ".")))


def _next_run(work_dir: Path, output: Path, kind: OutputKind) -> int:
    names = [path.name for path in work_dir.iterdir()] if work_dir.is_dir() else []
    if kind == "dataset" and output.is_dir():
        names += [path.name for path in output.iterdir()]
    runs = [int(match.group(1)) for match in map(_PART_RE.match, names) if match]
    return max(runs, default=-1) + 1


def _read_run_file(work_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((work_dir / RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise OutputError(f"{work_dir / RUN_FILE}: unreadable ({exc}); remove {work_dir} or pass --overwrite") from exc


def check_output(output: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> OutputKind:
    """Refuse an output that cannot be used as asked, touching nothing: a format the name does not tell, an
    existing output or an interrupted run's parts without --resume/--overwrite, --resume on stdout.

    Cheap, so commands call it before they load a model (ramtag.engine.preflight); returns the output's kind.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    kind = output_kind(output)
    if kind == "stdout":
        if resume:
            raise UsageError("--resume needs an output file; stdout cannot be resumed")
        return kind
    path = Path(output)
    if not (resume or overwrite):
        if path.exists():
            raise OutputError(f"{path} exists; pass --resume to tag only what is missing or --overwrite to replace it")
        work_dir = _work_dir(path)
        if _part_files(work_dir):
            raise OutputError(
                f"an interrupted run left finished parts in {work_dir}; pass --resume to continue it "
                "or --overwrite to start over"
            )
    return kind


def prepare_output(
    output: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    identity: Mapping[str, Any] | None = None,
) -> OutputLayout | None:
    """Check the output and start a run in its work directory (rank 0, before the other ranks).

    ``identity`` holds what must not change between a run and its resumption (vocabulary and
    model fingerprints, thresholds, top k, columns): resuming with a different one is refused.
    Returns None for stdout, which has no files.
    """
    kind = check_output(output, resume=resume, overwrite=overwrite)
    if kind == "stdout":
        return None
    path = Path(output)
    _lock_output(path)
    try:
        check_output(output, resume=resume, overwrite=overwrite)  # again under the lock: a run may have ended since
        return _prepare_file_output(path, kind, resume=resume, overwrite=overwrite, identity=identity)
    except BaseException:
        _unlock_output(path)
        raise


def _lock_file(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


_HELD_LOCKS: dict[Path, Any] = {}


def _lock_output(output: Path) -> None:
    """One run at a time per output: a second one (say, a --resume while the old ranks still run) is refused.
    The lock is an flock, so the system drops it when its process ends, however it ends."""
    import fcntl

    key = output.resolve()
    _unlock_output(output)  # this process starting over (sequential runs in one process, tests)
    lock = _lock_file(output)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")  # noqa: SIM115 - held until the run ends
    except OSError as exc:
        raise OutputError(f"cannot create {lock}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutputError(
            f"another ramtag run is writing {output} now (it holds {lock}); wait for it, or stop all of its "
            "processes, then rerun with --resume"
        ) from None
    _HELD_LOCKS[key] = handle


def _unlock_output(output: Path) -> None:
    handle = _HELD_LOCKS.pop(output.resolve(), None)
    if handle is not None:
        _lock_file(output).unlink(missing_ok=True)
        handle.close()


def _prepare_file_output(
    path: Path, kind: OutputKind, *, resume: bool, overwrite: bool, identity: Mapping[str, Any] | None
) -> OutputLayout:
    work_dir = _work_dir(path)
    has_parts = bool(_part_files(work_dir))
    if path.exists() and kind != "dataset" and path.is_dir():
        raise OutputError(f"{path} is a directory; end the path with / to write a partitioned dataset there")
    if path.exists() and (resume or (overwrite and kind == "dataset")):  # --overwrite may replace a named file
        _refuse_foreign_output(path, kind)
    if work_dir.exists() and (overwrite or not has_parts):  # nothing worth keeping
        shutil.rmtree(work_dir)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {work_dir}: {exc.strerror or exc}") from exc
    identity = json.loads(json.dumps(dict(identity or {}), default=str))  # as it reads back
    previous = _read_run_file(work_dir)
    if previous:
        _check_identity(path, previous.get("identity"), identity, "started")
        extends_output = bool(previous.get("extends_output"))
    else:  # the first run in this work directory decides whether the old output is kept
        extends_output = resume and path.exists()
    if extends_output and path.exists():
        _check_identity(path, read_table_metadata(path).get("identity"), identity, "written")
    run = _next_run(work_dir, path, kind)
    write_json(
        work_dir / RUN_FILE, {"run": run, "identity": identity, "extends_output": extends_output}
    )
    return OutputLayout(path, kind, work_dir, run, extends_output)


def _refuse_foreign_output(path: Path, kind: OutputKind) -> None:
    """Only a tag table that ramtag wrote is extended or replaced: `-o photos/ --resume` must never delete photos."""
    if kind == "dataset":
        if not path.is_dir():
            raise OutputError(f"{path} exists and is not a directory; choose another output")
        foreign = sorted(
            entry.name for entry in path.iterdir()
            if entry.name not in _DATASET_METADATA_FILES and not _PART_RE.match(entry.name)
        )
        if foreign:
            raise OutputError(
                f"{path} holds files that ramtag did not write ({listed(foreign, 3, quote=False)}); "
                "choose another output folder"
            )
        if not any(path.iterdir()):
            return
    try:
        ours = bool(read_table_metadata(path))
    except OutputError:
        ours = False
    if not ours:
        raise OutputError(f"{path} exists and is not a ramtag tag table; choose another output")


def _check_identity(path: Path, stored: Mapping[str, Any] | None, identity: Mapping[str, Any], verb: str) -> None:
    if stored is None:
        return
    changed = sorted(name for name in set(stored) | set(identity) if stored.get(name) != identity.get(name))
    if changed:
        raise OutputError(
            f"cannot resume {path}: it was {verb} with a different {', '.join(changed)}; pass --overwrite to start over"
        )


def attach_output(output: str | os.PathLike) -> OutputLayout | None:
    """The layout :func:`prepare_output` created (for ranks other than 0, after a barrier)."""
    kind = output_kind(output)
    if kind == "stdout":
        return None
    path = Path(output)
    work_dir = _work_dir(path)
    info = _read_run_file(work_dir)
    if "run" not in info:
        raise OutputError(f"{work_dir}: no run was prepared (call prepare_output on rank 0 first)")
    return OutputLayout(path, kind, work_dir, int(info["run"]), bool(info.get("extends_output")))


def _read_key_tables(sources: Sequence[Path]) -> list[pa.Table]:
    tables = []
    for source in sources:
        try:
            if source.suffix.lower() in (".jsonl", ".ndjson"):
                tables.append(_read_jsonl_keys(source))
            else:
                tables.append(pq.read_table(source, columns=["key", "error"]))
        except OutputError:
            raise
        except Exception as exc:
            raise OutputError(f"{source}: cannot read earlier output ({exc})") from exc
    return tables


def _read_jsonl_keys(path: Path) -> pa.Table:
    rows = [row for _, row in iter_jsonl_rows(path)]
    keys = [row["key"] for row in rows]
    errors = [row.get("error") for row in rows]
    return pa.table({"key": pa.array(keys, pa.string()), "error": pa.array(errors, pa.string())})


def iter_jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for each non-blank line of a JSONL tag table; every row has a string ``key``.

    Raises OutputError naming the line when it is not JSON or not such an object.
    """
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OutputError(f"{path}:{number}: invalid JSON: {exc.msg}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("key"), str):
                raise OutputError(f"{path}:{number}: expected an object with a string 'key'")
            yield number, row


# ---------------------------------------------------------------------------------------------
# Writing


class TagTableWriter:
    """Write tag rows from a background thread; :meth:`write` only enqueues.

    With a layout (files), rows go to part files of this rank; with ``layout=None``, JSON lines
    go to ``stdout`` as they come. Call :meth:`close` when done (also after an interruption:
    it keeps every row written so far).
    """

    def __init__(
        self,
        layout: OutputLayout | None,
        labels: Sequence[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        all_scores: bool = False,
        extra_schema: pa.Schema | None = None,
        rank: int = 0,
        row_group_rows: int = 16_384,
        rows_per_part: int = 262_144,
        part_seconds: float = 60.0,
        queue_batches: int = 64,
        stdout: TextIO | None = None,
    ) -> None:
        self.layout = layout
        self.labels = pa.array(list(labels), pa.string())
        self.metadata = dict(metadata or {})
        self.schema = table_schema(extra_schema, all_scores).with_metadata(
            {METADATA_KEY: json.dumps(self.metadata, ensure_ascii=False, default=str)}
        )
        self._extra_schema = extra_schema
        self.rank = rank
        self.row_group_rows = max(1, row_group_rows)
        self.rows_per_part = max(self.row_group_rows, rows_per_part)
        self.part_seconds = part_seconds
        self.stdout = stdout
        self.rows_written = 0
        self.parts_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_batches))
        self._error: BaseException | None = None
        self._closed = False
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._part: pq.ParquetWriter | None = None
        self._part_path: Path | None = None
        self._part_rows = 0
        self._unsaved_since: float | None = None
        self._chunk = 0
        if layout is not None:
            self._remove_stale_temporaries()
        self._thread = threading.Thread(target=self._run, name=f"ramtag-writer-{rank}", daemon=True)
        self._thread.start()

    # -- caller side -----------------------------------------------------------------------

    def write(self, batch: TagBatch) -> None:
        """Queue rows for writing (the batch is read later: do not change its arrays afterwards).

        Raises :class:`OutputError` if the writer thread failed.
        """
        if self._closed:
            raise OutputError("write after close")
        if len(batch) == 0:
            return
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued, finish the open part, record this rank as done."""
        if self._closed:
            self._raise_if_failed()
            return
        self._closed = True
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise_if_failed()
        if self.layout is not None:
            marker = self.layout.work_dir / f"done-{self.layout.run}-r{self.rank}.json"
            write_json(marker, {"rows": self.rows_written, "parts": self.parts_written})

    def finalize(self, world_size: int = 1) -> Path | None:
        """Rank 0, after every rank closed (a barrier): assemble the final output."""
        self.close()
        if self.rank != 0:
            raise OutputError("only rank 0 assembles the output")
        return finalize_output(
            self.layout,
            world_size=world_size,
            metadata=self.metadata,
            all_scores="scores" in self.schema.names,
            extra_schema=self._extra_schema,
        )

    def __enter__(self) -> TagTableWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            if isinstance(error, OutputError):
                raise error
            raise OutputError(f"writing the output failed: {error}") from error

    # -- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=max(0.05, min(1.0, self.part_seconds / 4)))
                except queue.Empty:
                    self._save_if_old()
                    continue
                if item is None:
                    break
                self._accept(batch_to_arrow(item, self.labels, self.schema))
            self._flush()
            self._close_part()
        except BaseException as exc:  # reported to the caller on its next call
            self._error = exc
            self._discard_part()

    def _accept(self, record_batch: pa.RecordBatch) -> None:
        if self.layout is None:
            self._emit_stdout(record_batch)
            return
        self._pending.append(record_batch)
        self._pending_rows += record_batch.num_rows
        if self._unsaved_since is None:
            self._unsaved_since = time.monotonic()
        if self._pending_rows >= self.row_group_rows:
            self._flush()
        if self._part_rows >= self.rows_per_part:
            self._close_part()
        self._save_if_old()

    def _save_if_old(self) -> None:
        """Bound the work a kill can lose: rows older than ``part_seconds`` go into a finished part."""
        if self._unsaved_since is not None and time.monotonic() - self._unsaved_since >= self.part_seconds:
            self._flush()
            self._close_part()

    def _emit_stdout(self, record_batch: pa.RecordBatch) -> None:
        stream = self.stdout if self.stdout is not None else sys.stdout
        try:
            stream.write(rows_to_jsonl(record_batch))
            stream.flush()
        except BrokenPipeError as exc:  # `| head`: an intended early stop, which the CLI ends quietly
            raise ReaderGone("stdout was closed by the reader") from exc
        self.rows_written += record_batch.num_rows

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        self._pending, self._pending_rows = [], 0
        if self._part is None:
            self._open_part()
        assert self._part is not None
        self._part.write_table(table, row_group_size=self.row_group_rows)
        self._part_rows += table.num_rows
        self.rows_written += table.num_rows

    def _open_part(self) -> None:
        assert self.layout is not None
        name = f"part-{self.layout.run:06d}-r{self.rank:05d}-c{self._chunk:06d}.parquet"
        self._part_path = self.layout.work_dir / name
        temporary = self.layout.work_dir / f".tmp-r{self.rank}-{name}"
        self._part = pq.ParquetWriter(temporary, self.schema)
        self._part_rows = 0

    def _temporary(self) -> Path:
        assert self.layout is not None and self._part_path is not None
        return self.layout.work_dir / f".tmp-r{self.rank}-{self._part_path.name}"

    def _close_part(self) -> None:
        if self._part is None:
            return
        self._part.close()
        os.replace(self._temporary(), self._part_path)
        self._part = None
        self._unsaved_since = None
        self._chunk += 1
        self.parts_written += 1

    def _discard_part(self) -> None:
        if self._part is None:
            return
        try:
            self._part.close()
            self._temporary().unlink(missing_ok=True)
        except Exception:
            pass
        self._part = None

    def _remove_stale_temporaries(self) -> None:
        assert self.layout is not None
        for path in self.layout.work_dir.glob(f".tmp-r{self.rank}-part-*"):
            path.unlink(missing_ok=True)


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
    schema = table_schema(extra_schema, all_scores).with_metadata(
        {METADATA_KEY: json.dumps(metadata, ensure_ascii=False, default=str)}
    )
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


def read_table_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict a run stored with its table (Parquet file, dataset or JSONL sidecar)."""
    path = Path(path)
    try:
        if path.is_dir():
            schema = pq.read_schema(path / "_common_metadata")
        elif path.suffix.lower() in (".jsonl", ".ndjson"):
            sidecar = path.with_name(path.name + ".meta.json")
            return json.loads(sidecar.read_text(encoding="utf-8"))
        else:
            schema = pq.read_schema(path)
    except FileNotFoundError:
        return {}
    except Exception as exc:
        raise OutputError(f"{path}: cannot read its metadata ({exc})") from exc
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def count_rows(path: str | os.PathLike) -> int:
    """Rows in a finished tag table (for summaries and tests)."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    files = _dataset_files(path) if path.is_dir() else [path]
    return sum(pq.ParquetFile(file).metadata.num_rows for file in files)


__all__ = [
    "OutputLayout",
    "TagBatch",
    "TagTableWriter",
    "attach_output",
    "batch_to_arrow",
    "count_rows",
    "finalize_output",
    "iter_jsonl_rows",
    "output_kind",
    "prepare_output",
    "read_table_metadata",
    "rows_to_jsonl",
    "table_schema",
]
