"""A synthetic run state for benchmarks/scale.py: what a `ramtag tag MANIFEST -o DIR/` run killed near its end
leaves in its work folder, generated with pyarrow in minutes instead of tagging for days.

Written in ramtag's own formats, through its own code where that code can stream:

* ``run.json`` by :func:`~ramtag.data.layout.prepare_output`, ``units.json`` by ``_write_units_file`` with the
  spec ``plan_units`` freezes, so a resumed run takes the frozen path a real one takes;
* ``listing.arrow`` with the listing's schema, one record batch per unit, as ``ListingWriter`` writes it (that
  function takes the whole table, so its loop is repeated here unit by unit);
* parts named by :func:`~ramtag.data.ledger.part_name`, rows built by :func:`~ramtag.data.rows.batch_to_arrow`
  (5 tags of the 80 COCO labels a row), the schema and metadata a run writes; a template unit is built once
  and each unit gets its own keys, so parts differ only in keys and sources;
* ledger lines by :meth:`~ramtag.data.ledger.LedgerEntry.to_json`, 8 ranks' files, every unit but the last one
  of each rank: those 8 were in flight at the kill, with half their rows in a committed part;
* the manifest itself (a Parquet ``path`` column), which a resumed run names but does not read.

``old_design`` also writes the same rows as the design before work units kept them: 262,144-row parts named
``part-RUN-rRANK-cCHUNK.parquet``, which ``OutputLayout.finished_keys`` read into one set.
``tests/test_scale_bench.py`` checks at small size that the listing, units and parts equal what ramtag writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ramtag.data.layout import _unlock_output, prepare_output
from ramtag.data.ledger import LedgerEntry, LedgerWriter, part_name
from ramtag.data.listing import _BASE_FIELDS
from ramtag.data.listing_file import LISTING_FILE, LISTING_OPTIONS
from ramtag.data.rows import TagBatch, batch_to_arrow, schema_with_metadata, table_schema
from ramtag.data.units import Unit, _listing_spec, _write_units_file

RANKS = 8
OLD_PART_ROWS = 262_144
"""The part size of the design before work units (data/writers.py's default)."""
IDENTITY = {"vocabulary_fingerprint": "scale-bench", "model_fingerprint": "scale-bench", "top_k": 5}
_MANIFEST_GROUP = 1 << 20


def row_keys(start: int, count: int, per_unit: int) -> pa.Array:
    """Keys of rows ``start..start+count``: ``photos/UUUUUU/NNNNNNNNN.jpg`` (27 characters, unit ``U``), relative
    to the manifest's folder."""
    index = np.arange(start, start + count, dtype=np.int64)
    units = pc.utf8_lpad(pa.array(index // per_unit).cast(pa.string()), 6, "0")
    digits = pc.utf8_lpad(pa.array(index).cast(pa.string()), 9, "0")
    return pc.binary_join_element_wise("photos/", units, "/", digits, ".jpg", "")


def write_manifest(path: Path, rows: int, per_unit: int) -> None:
    """A Parquet manifest of ``rows`` relative paths (the ``path`` column) in 1M-row row groups."""
    schema = pa.schema([pa.field("path", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, _MANIFEST_GROUP):
            keys = row_keys(start, min(_MANIFEST_GROUP, rows - start), per_unit)
            writer.write_table(pa.table([keys], schema=schema))


def _template(rows: int, schema: pa.Schema, labels: pa.Array) -> pa.RecordBatch:
    rng = np.random.default_rng(0)
    batch = TagBatch(
        keys=[""] * rows,
        sources=[""] * rows,
        errors=[None] * rows,
        tag_counts=np.full(rows, 5, dtype=np.int64),
        tag_labels=np.concatenate([rng.choice(len(labels), 5, replace=False) for _ in range(rows)]),
        tag_scores=np.sort(rng.random(rows * 5, dtype=np.float32))[::-1].copy(),
    )
    return batch_to_arrow(batch, labels, schema)


def generate_state(
    root: Path, rows: int, units: int, *, labels: list[str], old_design: bool = False, parts_every: int = 1
) -> dict:
    """Write the state under ``root`` (``root/tags/`` is the output); returns what a resume needs and expects.

    ``parts_every`` > 1 writes the parts of every n-th done unit only (in-flight units always have theirs):
    a resume must not open a done unit's part, so the others are only names in the ledger."""
    if rows % units:
        raise ValueError(f"{rows} rows do not split into {units} equal units")
    per_unit = rows // units
    root.mkdir(parents=True, exist_ok=True)
    output, manifest = root / "tags", root / "manifest.parquet"
    write_manifest(manifest, rows, per_unit)
    layout = prepare_output(f"{output}/", identity=IDENTITY)
    _unlock_output(output)
    work = layout.work_dir
    spec = _listing_spec([str(manifest)], "path", (), None, None, None)
    _write_units_file(work, spec, [], [Unit(index, "rows", rows=per_unit, group=index) for index in range(units)])

    metadata = {"ramtag_version": "scale-bench", "vocabulary": labels, "top_k": 5, "identity": IDENTITY}
    schema = schema_with_metadata(table_schema(pa.schema([]), False), metadata)
    template = _template(per_unit, schema, pa.array(labels, pa.string()))
    key_at, source_at = schema.get_field_index("key"), schema.get_field_index("source")
    base = f"{root}/"
    in_flight = set(range(units - min(RANKS, units), units))
    ledgers = [LedgerWriter(work, 0, rank).path.open("w", encoding="utf-8") for rank in range(RANKS)]
    old = _OldParts(root / "old" / ".tags.parts", schema) if old_design else None
    listing_schema = pa.schema(_BASE_FIELDS)
    done_rows = 0
    with pa.ipc.new_file(work / LISTING_FILE, listing_schema, options=LISTING_OPTIONS) as listing:
        for unit in range(units):
            keys = row_keys(unit * per_unit, per_unit, per_unit)
            sources = pc.binary_join_element_wise(base, keys, "")
            columns = [keys, sources, sources, pa.nulls(per_unit, pa.string())]
            listing.write_batch(pa.record_batch(columns, listing_schema))
            rows_of_unit = template.set_column(key_at, schema.field(key_at), keys).set_column(
                source_at, schema.field(source_at), sources
            )
            name = part_name(unit, 0, 0)
            if unit in in_flight:
                pq.write_table(pa.Table.from_batches([rows_of_unit.slice(0, per_unit // 2)]), work / name,
                               row_group_size=16_384)
                continue
            if unit % parts_every == 0:
                pq.write_table(pa.Table.from_batches([rows_of_unit]), work / name, row_group_size=16_384)
            if old is not None:
                old.add(rows_of_unit)
            entry = LedgerEntry(unit=unit, run=0, rank=unit % RANKS, parts=[name], rows=per_unit, errors=0)
            ledgers[unit % RANKS].write(entry.to_json() + "\n")
            done_rows += per_unit
    for handle in ledgers:
        handle.close()
    if old is not None:
        old.close()
    state = {
        "output": f"{output}/", "manifest": str(manifest), "unit_rows": per_unit, "rows": rows, "units": units,
        "done_rows": done_rows, "in_flight": sorted(in_flight), "identity": IDENTITY, "parts_every": parts_every,
        "old_work": str(old.work) if old is not None else None, "old_rows": old.rows if old is not None else 0,
    }
    (root / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    return state


class _OldParts:
    """The done rows again, as the design before work units wrote them (one rank, 262,144-row parts)."""

    def __init__(self, work: Path, schema: pa.Schema) -> None:
        self.work, self.schema = work, schema
        work.mkdir(parents=True, exist_ok=True)
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = self.rows = self.chunk = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        if self.pending_rows >= OLD_PART_ROWS:
            self._write()

    def _write(self) -> None:
        table = pa.Table.from_batches(self.pending, schema=self.schema)
        pq.write_table(table, self.work / f"part-{0:06d}-r{0:05d}-c{self.chunk:06d}.parquet", row_group_size=16_384)
        self.rows += table.num_rows
        self.chunk += 1
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        if self.pending:
            self._write()
