"""Tag tables on object storage (``-o s3://bucket/tags/``, ``.parquet``, ``.jsonl``): a commit protocol without rename.

The bucket holds the run's state, so a run killed on one machine resumes on another. Beside the output
``s3://b/tags/`` its work folder ``s3://b/.tags.parts/`` holds, as a local output's work directory does:

- ``run.json``, ``units.json``, ``listing.arrow``: the run and its frozen plan (:mod:`ramtag.data.units`);
- ``part-u{unit}-r{run}-c{chunk}.parquet``: committed parts. Unique names (unit, run, chunk; the run number
  is the attempt), each uploaded whole: an object appears when its upload completes, never in part;
- ``ledger/r{run}-rank{rank}-u{unit}.json``: the record of what is committed, one object per unit, uploaded
  only after every part of the unit; a part that no ledger entry lists is not committed, and the next run
  deletes it. ``ledger/compact-r{run}.jsonl`` folds the entries earlier runs left, so a resume reads few objects;
- ``lease.json``: who writes the output now (see below).

Each rank writes through a local mirror of the work folder (the same code as a local output, with its renames),
and uploads each part as it is committed and each ledger entry after its parts. Parts that are uploaded leave
the local disk. The final assembly happens in the bucket: a dataset folder gets the parts by server-side copy
(filtered copies where the ledger drops rows), then ``_manifest.json`` (its files and rows), then ``_SUCCESS``,
last; a ``.parquet`` or ``.jsonl`` file is assembled locally by streaming and uploaded whole. Readers
(pyarrow.dataset, polars, DuckDB, Spark) read only the output folder, which holds committed parts only.

One writer per output: an object store has no flock. ``lease.json`` names the host and process of the run
and when it was last renewed (at every committed part and unit); a second run is refused while the lease is
live: its process is alive (same host), or it was renewed within :data:`LEASE_SECONDS` (another host). A lease
left by a killed run on this host is taken over at once, one from another host after it expires. This is a
guard against mistakes, not a lock: two runs started within the same second on two hosts are not excluded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ramtag.data import storage
from ramtag.data.layout import REMOTE_LEDGER_DIR as LEDGER_DIR
from ramtag.data.layout import RUN_FILE, SUCCESS_FILE, remote_output_exists, remote_work_url
from ramtag.data.layout import check_remote_output as check
from ramtag.data.ledger import UNIT_PART_RE, LedgerEntry
from ramtag.data.rows import rows_to_jsonl
from ramtag.errors import DataError, OutputError, UsageError

LEASE_FILE = "lease.json"
MANIFEST_FILE = "_manifest.json"
ASSEMBLED_FILE = "assembled.json"
LEASE_SECONDS = 600
_RENEW_SECONDS = 60
UNITS = "units.json"
_FROZEN_FILES = (RUN_FILE, UNITS, "listing.arrow")
_ENTRY_RE = re.compile(r"^r(\d+)-rank(\d+)-u(\d+)\.json$")
_COMPACT_RE = re.compile(r"^compact-r(\d+)\.jsonl$")
_OUTPUT_FILES = (SUCCESS_FILE, MANIFEST_FILE, "_common_metadata", "_metadata")


def _not_in(table: pa.Table, keys: Sequence[str]) -> pa.Array:
    return pc.invert(pc.is_in(table["key"], value_set=pa.array(list(keys), pa.string())))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RemoteWork:
    """A run's work folder in the bucket and its local mirror (picklable: every rank receives it)."""

    output: str
    kind: str
    mirror: str
    holder: dict[str, Any] = field(default_factory=dict)
    _renewed: float = 0.0

    @property
    def work(self) -> str:
        return remote_work_url(self.output)

    @property
    def local_output(self) -> Path:
        """The stand-in path the local code prepares: its work directory is the mirror of the bucket's."""
        name = storage.basename(self.output)
        return Path(self.mirror) / (name + ("/" if self.kind == "dataset" else ""))

    @property
    def local_work(self) -> Path:
        return Path(self.mirror) / f".{storage.basename(self.output)}.parts"

    # -- rank 0, before the local code prepares the mirror -------------------------------------

    @classmethod
    def begin(cls, output: str, *, resume: bool, overwrite: bool) -> RemoteWork:
        """Check the output, take its lease, and mirror the bucket's run state into a new local folder."""
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        kind = check(output, resume=resume, overwrite=overwrite)
        remote = cls(output, kind, tempfile.mkdtemp(prefix="ramtag-remote-"))
        try:
            remote._take_lease()
            if (resume or overwrite) and kind == "dataset":  # `-o s3://b/photos/ --overwrite` must not delete photos
                remote._refuse_foreign_output()
            if overwrite:
                for url, _ in storage.list_files(remote.work):
                    if storage.basename(url) != LEASE_FILE:
                        storage.delete(url)
            elif resume and remote_output_exists(output, kind) and not storage.exists(storage.join(remote.work, UNITS)):
                raise OutputError(
                    f"{output} has no ledger in {remote.work} (its work folder was removed), so --resume cannot "
                    "tell what is done; pass --overwrite to tag everything again"
                )
            remote._mirror_state()
        except BaseException:
            remote.release()
            raise
        return remote

    def has_work(self) -> bool:
        """Whether the mirror holds an earlier run's state (so the local code must treat this as a resume)."""
        return (self.local_work / RUN_FILE).exists()

    def _take_lease(self) -> None:
        lease = storage.join(self.work, LEASE_FILE)
        try:
            held = json.loads(storage.read_text(lease))
        except DataError:
            held = None
        except ValueError:
            held = None  # a torn lease is no lease
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        if held and self._lease_live(held, me):
            age = time.time() - float(held.get("renewed", 0))
            raise OutputError(
                f"another ramtag run (host {held.get('host')}, pid {held.get('pid')}) is writing {self.output}: its "
                f"lease {lease} was renewed {age:.0f} s ago; wait for it, or stop it and rerun with --resume "
                f"(a lease from another host expires {LEASE_SECONDS} s after its last renewal)"
            )
        self.holder = {**me, "started": time.time()}
        self.renew(force=True)

    @staticmethod
    def _lease_live(held: Mapping[str, Any], me: Mapping[str, Any]) -> bool:
        if held.get("host") == me["host"]:
            pid = int(held.get("pid", -1))
            return pid != me["pid"] and _pid_alive(pid)
        return time.time() - float(held.get("renewed", 0)) < LEASE_SECONDS

    def renew(self, *, force: bool = False) -> None:
        now = time.time()
        if force or now - self._renewed >= _RENEW_SECONDS:
            storage.write_text(storage.join(self.work, LEASE_FILE), json.dumps({**self.holder, "renewed": now}))
            self._renewed = now

    def _refuse_foreign_output(self) -> None:
        prefix = self.output.rstrip("/") + "/"
        foreign = sorted(
            url[len(prefix):] for url, _ in storage.list_files(prefix)
            if not (UNIT_PART_RE.match(storage.basename(url)) or storage.basename(url) in _OUTPUT_FILES)
        )
        if foreign:
            raise OutputError(
                f"{self.output} holds objects that ramtag did not write ({', '.join(foreign[:3])}"
                f"{' and more' if len(foreign) > 3 else ''}); choose another output folder"
            )

    def _mirror_state(self) -> None:
        self.local_work.mkdir(parents=True, exist_ok=True)
        for name in _FROZEN_FILES:
            url = storage.join(self.work, name)
            if storage.file_type(url) == "file":
                storage.download(url, self.local_work / name)
        by_file: dict[tuple[int, int], list[LedgerEntry]] = {}
        for entry in self.read_ledger():
            by_file.setdefault((entry.run, entry.rank), []).append(entry)
        for (run, rank), entries in sorted(by_file.items()):
            path = self.local_work / f"ledger-r{run:03d}-rank{rank:03d}.jsonl"
            path.write_text("".join(entry.to_json() + "\n" for entry in entries), encoding="utf-8")

    # -- the ledger in the bucket ---------------------------------------------------------------

    def read_ledger(self) -> list[LedgerEntry]:
        """Every entry in the bucket's ledger (compacted ones first), O(units) small reads in parallel."""
        found = storage.list_files(storage.join(self.work, LEDGER_DIR))
        compacts = sorted((int(m.group(1)), url) for url, _ in found if (m := _COMPACT_RE.match(storage.basename(url))))
        singles = [url for url, _ in found if _ENTRY_RE.match(storage.basename(url))]
        with ThreadPoolExecutor(max_workers=16) as pool:
            texts = list(pool.map(storage.read_text, [url for _, url in compacts] + singles))
        entries = []
        for url, text in zip([url for _, url in compacts] + singles, texts):
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    entries.append(LedgerEntry.from_json(json.loads(line)))
                except (ValueError, KeyError, TypeError) as exc:
                    raise OutputError(
                        f"{url}:{number}: unreadable ledger entry ({exc}); pass --overwrite to start over"
                    ) from exc
        return entries

    def latest(self) -> dict[int, LedgerEntry]:
        latest: dict[int, LedgerEntry] = {}
        for entry in self.read_ledger():
            current = latest.get(entry.unit)
            if current is None or entry.run >= current.run:
                latest[entry.unit] = entry
        return latest

    def _compact(self, run: int, latest: Mapping[int, LedgerEntry]) -> None:
        """Fold the entries earlier runs left into one object, written before the ones it replaces are deleted."""
        found = storage.list_files(storage.join(self.work, LEDGER_DIR))
        if len(found) <= 1:
            return
        target = storage.join(self.work, LEDGER_DIR, f"compact-r{run:03d}.jsonl")
        storage.write_text(target, "".join(latest[unit].to_json() + "\n" for unit in sorted(latest)))
        for url, _ in found:
            if url != target:
                storage.delete(url)

    # -- rank 0, after the local code planned the run ---------------------------------------------

    def after_plan(self, run: int, latest: Mapping[int, LedgerEntry], kept_parts: Iterable[str]) -> None:
        """Upload the run and its plan, fold the ledger, and delete parts no entry commits (a killed attempt's)."""
        for name in _FROZEN_FILES:
            local = self.local_work / name
            url = storage.join(self.work, name)
            if local.exists() and (name != "listing.arrow" or storage.file_type(url) != "file"):
                storage.upload(local, url)
        self._compact(run, latest)
        committed = {name for entry in latest.values() for name in entry.parts}
        for url, _ in storage.list_files(self.work, recursive=False):
            name = storage.basename(url)
            if UNIT_PART_RE.match(name) and name not in committed:
                storage.delete(url)
        self.fetch_parts(kept_parts)

    def fetch_parts(self, names: Iterable[str]) -> None:
        """Download committed parts a unit being redone keeps (to read which of their keys are done)."""
        for name in names:
            if not (self.local_work / name).exists():
                storage.download(storage.join(self.work, name), self.local_work / name)

    def fetch_plan(self) -> None:
        """On a rank of another host: the frozen plan the local code reads."""
        self.local_work.mkdir(parents=True, exist_ok=True)
        for name in _FROZEN_FILES:
            if not (self.local_work / name).exists():
                storage.download(storage.join(self.work, name), self.local_work / name)

    # -- every rank, from its part writer's thread -------------------------------------------------

    def part(self, local: Path) -> None:
        """A part committed locally: upload it under its unique name, then free the local disk."""
        storage.upload(local, storage.join(self.work, local.name))
        local.unlink(missing_ok=True)
        self.renew()

    def unit(self, entry: LedgerEntry) -> None:
        """A unit committed locally, after its parts: its ledger entry goes to the bucket, which commits it."""
        name = f"r{entry.run:03d}-rank{entry.rank:03d}-u{entry.unit:06d}.json"
        storage.write_text(storage.join(self.work, LEDGER_DIR, name), entry.to_json() + "\n")
        self.renew()

    # -- rank 0, after every rank closed its writer ----------------------------------------------

    def finalize(self, unit_ids: Sequence[int], schema: pa.Schema, metadata: Mapping[str, Any]) -> tuple[str, int, int]:
        """Assemble the output from the bucket's ledger; ``(output, rows, errors)``. Releases the lease."""
        latest = self.latest()
        missing = [unit for unit in unit_ids if unit not in latest]
        if missing:
            raise OutputError(
                f"{len(missing)} work unit(s) did not finish; the committed parts are kept in {self.work}: "
                "rerun with --resume"
            )
        ordered = [latest[unit] for unit in sorted(unit_ids)]
        stamp = ";".join(f"{entry.unit}:{entry.run}" for entry in ordered) + f"|{self.kind}"
        marker = storage.join(self.work, ASSEMBLED_FILE)
        try:
            done = json.loads(storage.read_text(marker)).get("stamp") == stamp
        except (DataError, ValueError):
            done = False
        if not (done and remote_output_exists(self.output, self.kind)):
            if self.kind == "dataset":
                self._assemble_dataset(ordered)
            else:
                self._assemble_file(ordered, schema)
                if self.kind == "jsonl":
                    storage.write_text(self.output + ".meta.json", json.dumps(dict(metadata), indent=2, default=str))
            storage.write_text(marker, json.dumps({"stamp": stamp}))
        self.release()
        return self.output, sum(e.rows for e in ordered), sum(e.errors for e in ordered)

    def _pieces(self, entries: Sequence[LedgerEntry], schema: pa.Schema):
        for entry in entries:
            for name in entry.parts:
                dropped = entry.drop.get(name)
                parquet = pq.ParquetFile(storage.open_random_access(storage.join(self.work, name)))
                for group in range(parquet.num_row_groups):
                    table = parquet.read_row_group(group)
                    if dropped:
                        table = table.filter(_not_in(table, dropped))
                    yield table.replace_schema_metadata(schema.metadata)

    def _assemble_file(self, entries: Sequence[LedgerEntry], schema: pa.Schema) -> None:
        local = Path(self.mirror) / f"assembled-{storage.basename(self.output)}"
        if self.kind == "parquet":
            with pq.ParquetWriter(local, schema) as writer:
                for table in self._pieces(entries, schema):
                    writer.write_table(table, row_group_size=65_536)
        else:
            with open(local, "w", encoding="utf-8") as handle:
                for table in self._pieces(entries, schema):
                    for batch in table.to_batches(max_chunksize=4096):
                        handle.write(rows_to_jsonl(batch))
        storage.upload(local, self.output)
        local.unlink(missing_ok=True)

    def _assemble_dataset(self, entries: Sequence[LedgerEntry]) -> None:
        prefix = self.output.rstrip("/") + "/"
        storage.delete(prefix + SUCCESS_FILE)  # while it is missing, the folder is being updated
        present = dict(storage.list_files(prefix, recursive=False))
        sizes = dict(storage.list_files(self.work, recursive=False))
        copies, filtered = [], []
        wanted: set[str] = set()
        for entry in entries:
            for name in entry.parts:
                wanted.add(name)
                source, target = storage.join(self.work, name), prefix + name
                if entry.drop.get(name):
                    filtered.append((source, target, entry.drop[name]))
                elif present.get(target) != sizes.get(source):  # parts never change: the same size is the same part
                    copies.append((source, target))
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda pair: storage.copy(*pair), copies))
            list(pool.map(lambda job: self._filtered_copy(*job), filtered))
            list(pool.map(storage.delete, [url for url in present if storage.basename(url) not in wanted]))
        rows = sum(entry.rows for entry in entries)
        storage.write_text(prefix + MANIFEST_FILE, json.dumps({"files": sorted(wanted), "rows": rows}, indent=2) + "\n")
        storage.write_bytes(prefix + SUCCESS_FILE, b"")

    def _filtered_copy(self, source: str, target: str, dropped: Sequence[str]) -> None:
        local = Path(self.mirror) / f"filtered-{storage.basename(target)}"
        parquet = pq.ParquetFile(storage.open_random_access(source))
        with pq.ParquetWriter(local, parquet.schema_arrow) as writer:
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                writer.write_table(table.filter(_not_in(table, dropped)))
        storage.upload(local, target)
        local.unlink(missing_ok=True)

    def release(self) -> None:
        """Give the output up: the lease goes (if it is still ours) and the local mirror with it."""
        lease = storage.join(self.work, LEASE_FILE)
        try:
            held = json.loads(storage.read_text(lease))
            if held.get("host") == self.holder.get("host") and held.get("pid") == self.holder.get("pid"):
                storage.delete(lease)
        except (DataError, OutputError, ValueError):
            pass
        shutil.rmtree(self.mirror, ignore_errors=True)
