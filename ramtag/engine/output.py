"""The output of a run of work units, behind one object: plan the units, claim them, write rows, commit, finalise.

:meth:`RunOutput.open` (every rank, together): rank 0 checks the output and locks it, starts a run in its
work directory, freezes the listing and the unit list on the first run, reads the ledger and decides which
units are still to do; the other ranks receive that small list (O(units), never O(images)). Each rank then
claims its units, writes their rows through :meth:`RunOutput.writer`, and rank 0 finalises once every rank
closed its writer. ``-o -`` has no work directory to keep: its listing goes to a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa

from ramtag.data import storage
from ramtag.data.assemble import finish_units, run_identity
from ramtag.data.layout import _has_unit_work, _unlock_output, output_kind, prepare_output
from ramtag.data.ledger import LedgerEntry, latest_entries, parts_on_disk
from ramtag.data.parts import UnitPartWriter
from ramtag.data.remote_output import RemoteWork
from ramtag.data.rows import schema_with_metadata, table_schema
from ramtag.data.units import UNITS_FILE, Unit, UnitTask, plan_units
from ramtag.engine import dist
from ramtag.engine.claims import Claims, claim_units
from ramtag.errors import OutputError, UsageError


@dataclass(frozen=True)
class InputOptions:
    """What :func:`~ramtag.data.units.plan_units` lists, as the tag command's options give it."""

    inputs: Sequence[str]
    path_column: str = "path"
    keep_columns: Sequence[str] = ()
    root: str | None = None
    unit_rows: int = 16_384
    allow_empty: bool = False
    image_column: str | None = None
    """Parquet/Arrow inputs hold their images in this column (see :mod:`ramtag.data.image_tables`)."""
    key_column: str | None = None


@dataclass
class FinalTable:
    """The finished output: where, how many rows, how many of them errors."""

    path: str | None
    rows: int
    errors: int


class RunOutput:
    """One run's output (see the module docstring); build it with :meth:`open`."""

    def __init__(
        self,
        output: str,
        kind: str,
        work_dir: Path,
        run: int,
        tasks: list[UnitTask],
        listing: Path,
        extra_schema: pa.Schema,
        unit_ids: list[int],
        done_rows: int,
        done_errors: int,
        remote: RemoteWork | None = None,
    ) -> None:
        self.output = output
        self.kind = kind
        self.work_dir = work_dir
        self.run = run
        self.tasks = tasks
        self.listing = listing
        self.extra_schema = extra_schema
        self.unit_ids = unit_ids
        self.done_rows = done_rows
        """Rows of units that earlier runs finished and this run skips."""
        self.done_errors = done_errors
        self.remote = remote
        """The bucket's work folder when the output is on object storage (``work_dir`` is then its local mirror)."""
        self._writer: UnitPartWriter | None = None

    @classmethod
    def open(
        cls,
        output: str,
        inputs: InputOptions,
        *,
        resume: bool = False,
        overwrite: bool = False,
        retry_errors: bool = False,
        identity: Mapping[str, Any] | None = None,
        stdin: TextIO | None = None,
        workers: int = 0,
        log: Callable[[str], None] = lambda message: None,
    ) -> RunOutput:
        """Every rank calls this together; rank 0 prepares, the others receive its plan (or its error)."""
        info = dist.info()
        state, problem = None, None
        if info.is_main:
            try:
                state = _prepare(output, inputs, resume, overwrite, retry_errors, identity, stdin, workers, log)
            except Exception as error:  # shared so that every rank stops with the same message
                problem = error
        state, problem = dist.broadcast_object((state, problem))
        if problem is not None:
            raise problem
        remote = state.get("remote")
        if remote is not None and not info.is_main:  # a rank on another host has no mirror yet
            remote.fetch_plan()
            remote.fetch_parts(name for task in state["tasks"] for name in task.parts)
        return cls(**state)

    @property
    def is_stdout(self) -> bool:
        return self.kind == "stdout"

    def claim(self, workers: int) -> Claims:
        """How this rank's readers get their units (every rank together): claimed one at a time from a
        counter all ranks share (:mod:`ramtag.engine.claims`)."""
        return claim_units(self.tasks, workers)

    def pending_rows(self) -> int | None:
        """Rows still to read when known before reading (units of the listing only), else None."""
        if any(task.unit.kind == "shard" for task in self.tasks):
            return None
        return sum(task.unit.rows for task in self.tasks)

    def schema(self, metadata: Mapping[str, Any], all_scores: bool) -> pa.Schema:
        return schema_with_metadata(table_schema(self.extra_schema, all_scores), metadata)

    def writer(
        self, labels: Sequence[str], metadata: Mapping[str, Any], *, all_scores: bool, rank: int, part_rows: int
    ) -> UnitPartWriter:
        self._writer = UnitPartWriter(
            None if self.is_stdout else self.work_dir,
            self.schema(metadata, all_scores),
            labels,
            run=self.run,
            rank=rank,
            part_rows=part_rows,
            row_group_rows=min(16_384, part_rows),
            stdout=sys.stdout if self.is_stdout else None,
            publish=self.remote,
        )
        return self._writer

    def finalize(self, metadata: Mapping[str, Any], *, all_scores: bool, failed_now: int) -> FinalTable:
        """Rank 0, after every rank closed its writer: check every unit is done, assemble, unlock."""
        if self.is_stdout:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            return FinalTable(None, 0, failed_now)
        if self.remote is not None:
            stored = dict(metadata)
            stored.setdefault("identity", run_identity(self.work_dir))
            _unlock_output(self.remote.local_output)
            url, rows, errors = self.remote.finalize(self.unit_ids, self.schema(stored, all_scores), stored)
            return FinalTable(url, rows, errors)
        path = Path(self.output)
        rows, errors = finish_units(
            path, self.kind, self.work_dir, self.unit_ids, metadata, table_schema(self.extra_schema, all_scores)
        )
        _unlock_output(path)
        return FinalTable(str(path), rows, errors)

    def release(self) -> None:
        """Give up the output without finalising (an interrupted or failed run): rank 0's lock goes."""
        if self.is_stdout:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        elif dist.info().is_main and self.remote is not None:
            _unlock_output(self.remote.local_output)
            self.remote.release()
        elif dist.info().is_main:
            _unlock_output(Path(self.output))


def _prepare_remote(output, inputs: InputOptions, resume, overwrite, retry_errors, identity, stdin, workers, log):
    """An object-storage output: the bucket's run state mirrored locally, prepared by the local code, then the
    plan uploaded (see :mod:`ramtag.data.remote_output`)."""
    remote = RemoteWork.begin(output, resume=resume, overwrite=overwrite)
    stand_in = os.fspath(remote.local_output) + ("/" if remote.kind == "dataset" else "")
    try:
        state = _prepare(stand_in, inputs, resume, overwrite, retry_errors, identity, stdin, workers, log)
        entries = latest_entries(state["work_dir"], before_run=state["run"])
        remote.after_plan(state["run"], entries, [name for task in state["tasks"] for name in task.parts])
    except BaseException as error:
        _unlock_output(remote.local_output)
        remote.release()
        if isinstance(error, OutputError | UsageError):  # name the bucket's paths, not the mirror's
            message = str(error).replace(os.fspath(remote.local_work), remote.work)
            raise type(error)(message.replace(os.fspath(remote.local_output), output.rstrip("/"))) from None
        raise
    return {**state, "output": output, "remote": remote}


def _prepare(output, inputs: InputOptions, resume, overwrite, retry_errors, identity, stdin, workers, log) -> dict:
    if storage.is_remote(output):
        return _prepare_remote(output, inputs, resume, overwrite, retry_errors, identity, stdin, workers, log)
    kind = output_kind(output)
    info = dist.info()
    if kind == "stdout":
        prepare_output(output, resume=resume, overwrite=overwrite)  # refuses --resume
        work_dir, run = Path(tempfile.mkdtemp(prefix="ramtag-listing-")), 0
    else:
        layout = prepare_output(
            output, resume=resume, overwrite=overwrite, identity=identity, job=dist.job_id(),
            job_restarted=dist.restart_count() > 0,
        )
        assert layout is not None
        work_dir, run = layout.work_dir, layout.run
    try:
        if kind == "dataset":
            _clean_dataset_leftovers(Path(output))
        if kind != "stdout" and resume and layout.extends_output and not (work_dir / UNITS_FILE).exists():
            raise OutputError(
                f"{output} has no ledger in {work_dir} (an earlier ramtag wrote it, or its work folder was "
                "removed), so --resume cannot tell what is done; pass --overwrite to tag everything again"
            )
        for path in work_dir.glob(".tmp-part-*"):  # parts a killed run was writing
            path.unlink(missing_ok=True)
        plan = plan_units(
            inputs.inputs,
            work_dir,
            unit_rows=inputs.unit_rows,
            spread_over=4 * info.world_size * max(1, workers),
            path_column=inputs.path_column,
            keep_columns=inputs.keep_columns,
            stdin=stdin,
            root=inputs.root,
            on_warning=lambda message: log(f"ramtag: warning: {message}"),
            allow_empty=inputs.allow_empty,
            image_column=inputs.image_column,
            key_column=inputs.key_column,
        )
        entries = latest_entries(work_dir, before_run=run)
        retried_since = run if kind == "stdout" else layout.job_first_run
        tasks, done_rows, done_errors = _still_to_do(
            work_dir, plan.units, entries, retry_errors and resume, retried_since
        )
    except BaseException:
        if kind == "stdout" or not _has_unit_work(work_dir):  # nothing committed: leave nothing behind
            shutil.rmtree(work_dir, ignore_errors=True)
        if kind != "stdout":
            _unlock_output(Path(output))
        raise
    return {
        "output": os.fspath(output),
        "kind": kind,
        "work_dir": work_dir,
        "run": run,
        "tasks": tasks,
        "listing": plan.listing,
        "extra_schema": plan.extra_schema,
        "unit_ids": [unit.id for unit in plan.units],
        "done_rows": done_rows,
        "done_errors": done_errors,
    }


def _still_to_do(
    work_dir: Path, units: Sequence[Unit], entries: Mapping[int, LedgerEntry], retry_errors: bool,
    retried_since: int | None = None,
) -> tuple[list[UnitTask], int, int]:
    """Units without a ledger entry (or, retrying, with errors committed before run ``retried_since``: a
    restarted group does not retry what its first start already retried), each with the committed parts it keeps.

    Reads file names only: no part of a done unit is opened. Parts that no entry lists and that no unit
    still to do keeps (an attempt superseded by a later entry) are removed."""
    on_disk = parts_on_disk(work_dir)
    tasks: list[UnitTask] = []
    done_rows = done_errors = 0
    for unit in units:
        entry = entries.get(unit.id)
        found = on_disk.get(unit.id, [])
        if entry is None:
            tasks.append(UnitTask(unit, tuple(name for _, _, name in found)))
            continue
        unlisted = [(run, name) for run, _, name in found if name not in set(entry.parts)]
        if retry_errors and entry.errors and (retried_since is None or entry.run < retried_since):
            later = tuple(name for run, name in unlisted if run > entry.run)  # a retry killed in flight
            tasks.append(UnitTask(unit, tuple(entry.parts) + later, dict(entry.drop), retry_errors=True))
            garbage = [name for run, name in unlisted if run <= entry.run]
        else:
            done_rows += entry.rows
            done_errors += entry.errors
            garbage = [name for _, name in unlisted]
        for name in garbage:
            (work_dir / name).unlink(missing_ok=True)
    return tasks, done_rows, done_errors


def _clean_dataset_leftovers(output: Path) -> None:
    """Folders an older ramtag left beside a dataset output when killed while replacing it."""
    parent = output.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".old-{output.name}-*"))
    if not output.exists() and olds:  # killed between moving the old output aside and the new one in
        os.replace(olds.pop(), output)
    for leftover in olds + sorted(parent.glob(f".tmp-{output.name}-*")):
        shutil.rmtree(leftover, ignore_errors=True)
