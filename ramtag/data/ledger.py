"""The ledger of a run of work units: which units are done, and which part files hold their rows.

Each rank of each run appends to its own file ``ledger-r{run}-rank{rank}.jsonl`` in the output's work
directory, one JSON line per unit, written only after every part of the unit was committed by rename,
then flushed and fsynced. A kill can tear only the last line of a file (the next run writes new files),
so a torn last line is ignored when reading. The newest line of a unit (highest run) is its state;
reading the ledger costs O(units), never O(rows).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ramtag.errors import OutputError

LEDGER_RE = re.compile(r"^ledger-r(\d+)-rank(\d+)\.jsonl$")
UNIT_PART_RE = re.compile(r"^part-u(\d+)-r(\d+)-c(\d+)\.parquet$")


def part_name(unit: int, run: int, chunk: int) -> str:
    """The file name of chunk ``chunk`` of unit ``unit`` written by run ``run``."""
    return f"part-u{unit:06d}-r{run:03d}-c{chunk:03d}.parquet"


@dataclass
class LedgerEntry:
    """A unit recorded as done: its rows are the rows of ``parts`` minus the keys ``drop`` names per part."""

    unit: int
    run: int
    rank: int
    parts: list[str]
    rows: int
    errors: int
    """Error rows among ``rows`` (sample errors and the unit-level error row, if any)."""
    unit_error: str | None = None
    """Why the unit could not be read to its end (a shard that broke part-way), else None."""
    drop: dict[str, list[str]] = field(default_factory=dict)
    """Keys superseded by a later row of the same unit (a retried error), per part name."""

    def to_json(self) -> str:
        record: dict[str, Any] = {
            "unit": self.unit,
            "run": self.run,
            "rank": self.rank,
            "parts": self.parts,
            "rows": self.rows,
            "errors": self.errors,
            "unit_error": self.unit_error,
        }
        if self.drop:
            record["drop"] = self.drop
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> LedgerEntry:
        return cls(
            unit=int(record["unit"]),
            run=int(record["run"]),
            rank=int(record.get("rank", 0)),
            parts=[str(name) for name in record["parts"]],
            rows=int(record["rows"]),
            errors=int(record["errors"]),
            unit_error=record.get("unit_error"),
            drop={str(name): [str(key) for key in keys] for name, keys in (record.get("drop") or {}).items()},
        )


class LedgerWriter:
    """Appends this rank's done units to its ledger file, durably (flush and fsync per line)."""

    def __init__(self, work_dir: Path, run: int, rank: int) -> None:
        self.path = work_dir / f"ledger-r{run:03d}-rank{rank:03d}.jsonl"
        self._handle: IO[str] | None = None

    def append(self, entry: LedgerEntry) -> None:
        if self._handle is None:
            self._handle = self.path.open("a", encoding="utf-8")
        self._handle.write(entry.to_json() + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_ledger_file(path: Path) -> Iterator[LedgerEntry]:
    """The entries of one ledger file; a torn last line (a kill mid-write) is skipped, a bad line elsewhere is not."""
    with path.open(encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # A whole file ends with a newline, so its last piece is empty; anything else there is torn.
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            yield LedgerEntry.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError) as exc:
            raise OutputError(
                f"{path}:{number}: unreadable ledger line ({exc}); pass --overwrite to start over"
            ) from exc


def ledger_files(work_dir: Path) -> list[Path]:
    """Ledger files in the work directory, by (run, rank)."""
    if not work_dir.is_dir():
        return []
    found = [
        (tuple(map(int, match.groups())), path) for path in work_dir.iterdir() if (match := LEDGER_RE.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def latest_entries(work_dir: Path, *, before_run: int | None = None) -> dict[int, LedgerEntry]:
    """Per unit, its newest entry (highest run), from runs before ``before_run`` when given."""
    latest: dict[int, LedgerEntry] = {}
    for path in ledger_files(work_dir):
        for entry in read_ledger_file(path):
            if before_run is not None and entry.run >= before_run:
                continue
            current = latest.get(entry.unit)
            if current is None or entry.run >= current.run:
                latest[entry.unit] = entry
    return latest


def parts_on_disk(work_dir: Path) -> dict[int, list[tuple[int, int, str]]]:
    """Per unit, its committed part files as ``(run, chunk, name)``, oldest first (names only: no file is opened)."""
    found: dict[int, list[tuple[int, int, str]]] = {}
    if not work_dir.is_dir():
        return found
    for path in work_dir.iterdir():
        match = UNIT_PART_RE.match(path.name)
        if match:
            unit, run, chunk = map(int, match.groups())
            found.setdefault(unit, []).append((run, chunk, path.name))
    for parts in found.values():
        parts.sort()
    return found
