"""benchmarks/scale_state.py, at a small size: the synthetic run state it generates is the one ramtag writes, so the
figures of benchmarks/scale.py are those of a real run's state (and they cannot rot between runs of it)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from benchmarks.scale_state import generate_state
from ramtag.data.ledger import latest_entries
from ramtag.data.listing_file import open_listing
from ramtag.data.parts import UnitPartWriter
from ramtag.data.rows import METADATA_KEY, TagBatch
from ramtag.data.units import UNITS_FILE, UnitEnd, plan_units
from ramtag.engine.output import InputOptions, RunOutput

LABELS = ["cat", "dog", "red car", "tree", "sky", "road"]


def test_the_synthetic_state_is_what_ramtag_writes_and_resumes(tmp_path):
    units, per_unit = 24, 8
    state = generate_state(tmp_path / "state", units * per_unit, units, labels=LABELS, old_design=True)
    work = tmp_path / "state" / ".tags.parts"

    planned = tmp_path / "planned"  # what ramtag's own planning writes for the same manifest
    plan_units([state["manifest"]], planned, unit_rows=per_unit)
    assert json.loads((planned / UNITS_FILE).read_text()) == json.loads((work / UNITS_FILE).read_text())
    ours, theirs = open_listing(work / "listing.arrow"), open_listing(planned / "listing.arrow")
    assert ours.num_record_batches == theirs.num_record_batches == units
    assert ours.read_all().equals(theirs.read_all())

    output = RunOutput.open(
        state["output"], InputOptions([state["manifest"]], unit_rows=per_unit), resume=True,
        identity=state["identity"],
    )
    try:
        assert sorted(task.unit.id for task in output.tasks) == state["in_flight"] == list(range(16, 24))
        assert output.done_rows == state["done_rows"] == 16 * per_unit
        part = pq.read_table(work / "part-u000000-r000-c000.parquet")
        schema = output.schema(json.loads(part.schema.metadata[METADATA_KEY]), all_scores=False)
    finally:
        output.release()
    writer = UnitPartWriter(planned, schema, LABELS, run=0, rank=0)  # a row as a run writes it
    writer.write(TagBatch(["a"], ["a"], [None], np.array([1]), np.array([2]), np.array([0.5], np.float32)), [0])
    writer.commit(UnitEnd(0, None, (), 0, 0, {}))
    writer.close()
    written = pq.read_schema(planned / latest_entries(planned)[0].parts[0])
    assert written.equals(part.schema, check_metadata=True)
    assert part.num_rows == per_unit and len(set(part["key"].to_pylist())) == per_unit

    old = [pq.read_table(path, columns=["key"]) for path in sorted((tmp_path / "state" / "old").rglob("*.parquet"))]
    assert sum(table.num_rows for table in old) == state["old_rows"] == state["done_rows"]


def test_the_manifest_benchmark_plans_under_torchrun(tmp_path):
    """The benchmark's manifest part runs as the README reruns it (two gloo ranks), so it cannot rot unnoticed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAMTAG_BENCH_RESULTS": str(tmp_path / "results")}
    subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--quick", "--parts", "manifest", "--dir", str(tmp_path)],
        check=True, capture_output=True, env=env, timeout=300,
    )
    payload = json.loads((tmp_path / "results" / "scale.cpu.json").read_text())
    ranks = payload["manifest"]["samples"][0]["ranks"]
    rows = payload["manifest"]["rows"]
    assert [rank["rank"] for rank in ranks] == [0, 1]
    units = ranks[0]["units"]
    assert units > 2 and all(rank["units"] == units for rank in ranks)
    assert all(rank["unit_rows"] == -(-rows // units) for rank in ranks)  # each read one whole unit of the listing
