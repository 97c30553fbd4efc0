"""Where a tag table goes: its kind, its work directory beside it, the lock, and the run it starts.

Lifecycle of a run that writes to ``OUT`` (every path below is beside it):

1. rank 0: :func:`prepare_output` refuses an existing output unless resuming or overwriting,
   creates the hidden work directory ``.OUT.parts/`` and starts a new *run* in it;
2. every rank writes the part files of its work units into the work directory and commits each finished unit
   to the ledger (:mod:`ramtag.data.parts`, planned and shared by :class:`ramtag.engine.output.RunOutput`);
3. rank 0, after a barrier, assembles the final output from the ledger (:mod:`ramtag.data.assemble`).

Part files named ``part-RUN-rRANK-cCHUNK.parquet`` were written by an older ramtag, which had no ledger: they
are still recognised, so that such a table or its interrupted work is never taken for foreign files.

Output written to stdout is streamed directly and cannot be resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from ramtag.atomic import write_json
from ramtag.data import storage
from ramtag.data.ledger import LEDGER_RE, UNIT_PART_RE
from ramtag.data.rows import METADATA_KEY
from ramtag.errors import OutputError, UsageError
from ramtag.messages import listed

OutputKind = Literal["parquet", "jsonl", "stdout", "dataset"]

RUN_FILE = "run.json"
REMOTE_LEDGER_DIR = "ledger"
"""The folder of ledger objects in an object-storage work folder (:mod:`ramtag.data.remote_output`)."""
SUCCESS_FILE = "_SUCCESS"
_PART_RE = re.compile(r"^part-(\d+)-r(\d+)-c(\d+)\.parquet$")
_RUN_NUMBERED = (
    (_PART_RE, 1),
    (UNIT_PART_RE, 2),
    (LEDGER_RE, 1),
)
_DATASET_METADATA_FILES = ("_common_metadata", "_metadata", SUCCESS_FILE)

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
    job_first_run: int = -1
    """The first run of this job: ``run`` itself, or, in a group that ``torchrun --max-restarts`` restarted, the
    run its first start made (what that start already retried is not retried again)."""


def _work_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.parts")


def _part_files(work_dir: Path) -> list[Path]:
    """Part files an older ramtag's plain run left (see the module docstring)."""
    if not work_dir.is_dir():
        return []
    return sorted(path for path in work_dir.iterdir() if _PART_RE.match(path.name))


def _has_unit_work(work_dir: Path) -> bool:
    """Whether a run of work units committed anything here (a ledger line or a part)."""
    if not work_dir.is_dir():
        return False
    return any(LEDGER_RE.match(path.name) or UNIT_PART_RE.match(path.name) for path in work_dir.iterdir())


def _dataset_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.glob("*.parquet") if not path.name.startswith(("_", ".")))


def _next_run(work_dir: Path, output: Path, kind: OutputKind) -> int:
    names = [path.name for path in work_dir.iterdir()] if work_dir.is_dir() else []
    if kind == "dataset" and output.is_dir():
        names += [path.name for path in output.iterdir()]
    runs = [
        int(match.group(group)) for pattern, group in _RUN_NUMBERED for match in map(pattern.match, names) if match
    ]
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
    existing output or an interrupted run's work without --resume/--overwrite, --resume on stdout.

    Cheap, so commands call it before they load a model (ramtag.engine.preflight); returns the output's kind.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if storage.is_remote(output):  # never a local path: `s3://b/x` must not become the folder ./s3:/b/x
        return check_remote_output(os.fspath(output), resume=resume, overwrite=overwrite)
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
        if _part_files(work_dir) or _has_unit_work(work_dir):
            raise OutputError(
                f"an interrupted run left finished parts in {work_dir}; pass --resume to continue it "
                "or --overwrite to start over"
            )
    return kind


def remote_work_url(output: str) -> str:
    """The work folder beside an object-storage output: ``s3://b/tags/`` -> ``s3://b/.tags.parts``
    (what it holds: :mod:`ramtag.data.remote_output`)."""
    base = output.rstrip("/")
    return storage.join(storage.parent(base), f".{storage.basename(base)}.parts")


def remote_output_exists(output: str, kind: str) -> bool:
    if kind == "dataset":
        return bool(storage.list_files(output.rstrip("/") + "/"))
    return storage.file_type(output) == "file"


def check_remote_output(output: str, *, resume: bool = False, overwrite: bool = False) -> OutputKind:
    """:func:`check_output` for an object-storage output: reads the bucket, writes nothing."""
    kind = output_kind(output)
    if "/" not in storage.split(output)[1].strip("/"):
        raise UsageError(f"-o {output}: name a folder or file inside the bucket (such as {output.rstrip('/')}/tags/)")
    storage.check_bucket(output)
    if not (resume or overwrite):
        if remote_output_exists(output, kind):
            raise OutputError(
                f"{output} exists; pass --resume to tag only what is missing or --overwrite to replace it"
            )
        work = remote_work_url(output)
        names = storage.names_below(work)
        if any(UNIT_PART_RE.match(name) for name in names) or storage.list_files(storage.join(work, REMOTE_LEDGER_DIR)):
            raise OutputError(
                f"an interrupted run left finished parts in {work}; pass --resume to continue it "
                "or --overwrite to start over"
            )
    return kind


def prepare_output(
    output: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    identity: Mapping[str, Any] | None = None,
    job: str | None = None,
    job_restarted: bool = False,
) -> OutputLayout | None:
    """Check the output and start a run in its work directory (rank 0, before the other ranks).

    ``identity`` holds what must not change between a run and its resumption (vocabulary and
    model fingerprints, thresholds, top k, columns): resuming with a different one is refused.
    ``job`` names the launcher's job (torchrun's run id); ``job_restarted`` says this start is a restart of it,
    which continues the run its first start made.
    Returns None for stdout, which has no files.
    """
    _refuse_remote(output)
    kind = check_output(output, resume=resume, overwrite=overwrite)
    if kind == "stdout":
        return None
    path = Path(output)
    _lock_output(path)
    try:
        check_output(output, resume=resume, overwrite=overwrite)  # again under the lock: a run may have ended since
        return _prepare_file_output(path, kind, resume=resume, overwrite=overwrite, identity=identity, job=job,
                                    job_restarted=job_restarted)
    except BaseException:
        _unlock_output(path)
        raise


def _refuse_remote(output: str | os.PathLike) -> None:
    """This layout is local; object-storage outputs go through :class:`ramtag.engine.output.RunOutput`."""
    if storage.is_remote(output):
        raise OutputError(f"-o {os.fspath(output)}: this command writes local files only; tag writes to object storage")


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
        handle = open(lock, "a+")  # held until the run ends
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


def release_inherited_locks() -> None:
    """In a forked child (a DataLoader worker), drop this process's copies of the output locks.

    An flock belongs to the open file, which a fork shares: a worker that outlives its killed rank by the few
    seconds torch gives it would otherwise hold the lock, and the rank torchrun restarts would be refused
    ("another ramtag run is writing …") and spend a restart. Closing the child's copy leaves the parent's lock
    held and its lock file in place."""
    for handle in _HELD_LOCKS.values():
        handle.close()
    _HELD_LOCKS.clear()


def _unlock_output(output: Path) -> None:
    handle = _HELD_LOCKS.pop(output.resolve(), None)
    if handle is not None:
        _lock_file(output).unlink(missing_ok=True)
        handle.close()


def _prepare_file_output(
    path: Path, kind: OutputKind, *, resume: bool, overwrite: bool, identity: Mapping[str, Any] | None,
    job: str | None = None, job_restarted: bool = False,
) -> OutputLayout:
    work_dir = _work_dir(path)
    has_parts = bool(_part_files(work_dir)) or _has_unit_work(work_dir)
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
    same_job = job_restarted and job is not None and previous.get("job") == job and "job_first_run" in previous
    first_run = int(previous["job_first_run"]) if same_job else run
    record: dict[str, Any] = {"run": run, "identity": identity, "extends_output": extends_output}
    if job is not None:
        record.update(job=job, job_first_run=first_run)
    write_json(work_dir / RUN_FILE, record)
    return OutputLayout(path, kind, work_dir, run, extends_output, first_run)


def _refuse_foreign_output(path: Path, kind: OutputKind) -> None:
    """Only a tag table that ramtag wrote is extended or replaced: `-o photos/ --resume` must never delete photos."""
    if kind == "dataset":
        if not path.is_dir():
            raise OutputError(f"{path} exists and is not a directory; choose another output")
        foreign = sorted(
            entry.name for entry in path.iterdir()
            if entry.name not in _DATASET_METADATA_FILES
            and not (_PART_RE.match(entry.name) or UNIT_PART_RE.match(entry.name))
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


def read_table_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict a run stored with its table (Parquet file, dataset or JSONL sidecar).

    A dataset folder holds it in ``_common_metadata`` (older runs) or in its part files, whose schemas carry it.
    """
    path = Path(path)
    try:
        if path.is_dir():
            common = path / "_common_metadata"
            parts = _dataset_files(path)
            if common.exists() or not parts:
                schema = pq.read_schema(common)
            else:
                schema = pq.read_schema(parts[-1])
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
