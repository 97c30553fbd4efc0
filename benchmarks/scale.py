"""Scale of a run's own state (issue 14): what `--resume` planning and a manifest's first planning cost, 1M-100M rows.

1. Resume. A synthetic run state of N committed rows over U units (default 100,000 units; 1M, 10M and 100M
   rows), in the formats ramtag writes and generated without a model (benchmarks/scale_state.py): listing,
   unit list, ledger and parts of a `ramtag tag MANIFEST -o DIR/` run killed with the last unit of each of 8
   ranks in flight. Timed, each in a fresh child process, peak RSS its own (`VmHWM`):
   * `RunOutput.open(..., resume=True)`, the call `ramtag tag --resume` makes once the model is loaded: it locks
     the output, reads the frozen unit list and the ledger, lists the work folder and returns the units to redo;
   * then one DataLoader worker's first unit (`UnitDataset.read_unit`: the listing's footer, one row group, and
     the unit's committed part, whose keys it keeps);
   * against it, the design before work units (`OutputLayout.finished_keys`, still in data/layout.py): every
     finished key read into one Python set, which `ShardDataset` then pickled into every DataLoader worker of
     every rank. Run on the same rows in that design's 262,144-row parts, up to `--old-max-rows` (it needs
     about 150 bytes a key in one process); beyond that the figure is extrapolated linearly, and says so.
2. Manifest. The first planning of a Parquet manifest of M rows (default 10M) by 2 gloo ranks under torchrun
   on the CPU: each rank's peak RSS through `RunOutput.open`, then reading its first unit as a worker does.

Sizes run one at a time; each state is deleted before the next is generated (`--keep` keeps them). The page
cache is warm (the state was just written; dropping it needs root), so times are those of a warm restart.

    python benchmarks/scale.py                       # about an hour on 2 shared cores, 8 GB of disk at most
    python benchmarks/scale.py --rows 1M --manifest-rows 1M
    python benchmarks/scale.py --quick               # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from scale_state import generate_state, write_manifest

import common
from common import log

_SUFFIXES = {"k": 1_000, "M": 1_000_000, "G": 1_000_000_000}
STATE_BYTES_PER_ROW = 120
"""Disk a state takes per row (parts ~55, listing ~25, manifest ~10 bytes, measured), with a margin."""


def count(text: str) -> int:
    text = text.strip()
    return int(float(text[:-1]) * _SUFFIXES[text[-1]]) if text[-1] in _SUFFIXES else int(text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="resume,manifest")
    parser.add_argument("--rows", default="1M,10M,100M", help="committed rows of each resume state")
    parser.add_argument("--units", type=int, default=100_000)
    parser.add_argument("--old-max-rows", default="10M", help="largest state the old design is run on")
    parser.add_argument("--parts-every", type=int, default=1, help="write parts of every n-th done unit only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--manifest-rows", default="10M")
    parser.add_argument("--dir", default=None, help="where states are generated (default: the temp folder)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--label", default=None, help="suffix of the results file (scale.LABEL.cpu.json)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=["resume", "old", "plan"], help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.units, args.manifest_rows, args.repeats = "20k", 200, "20k", 1
    return args


# -- children: one measurement each, peak RSS their own ---------------------------------------------------------


def _peak_mib() -> float:
    """This process's peak RSS. Not ``getrusage``'s ``ru_maxrss``: Linux carries that across exec, so a child
    started by a parent of 1.2 GB reports at least 1.2 GB; ``VmHWM`` is the peak of this program's own memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB; not Linux


def child_resume(state: dict) -> dict:
    from ramtag.data.units import UnitDataset
    from ramtag.engine.output import InputOptions, RunOutput

    imported = _peak_mib()
    start = time.perf_counter()
    output = RunOutput.open(
        state["output"], InputOptions([state["manifest"]], unit_rows=state["unit_rows"]), resume=True,
        identity=state["identity"],
    )
    plan_seconds = time.perf_counter() - start
    planned = _peak_mib()
    try:
        redo = sorted(task.unit.id for task in output.tasks)
        assert redo == state["in_flight"], redo[:20]
        assert output.done_rows == state["done_rows"], (output.done_rows, state["done_rows"])
        assert all(len(task.parts) == 1 for task in output.tasks)  # the committed half of each unit is kept
        start = time.perf_counter()
        dataset = UnitDataset(output.tasks, output.work_dir, output.listing, lambda image: image)
        items = list(dataset.read_unit(output.tasks[0]))
        unit_seconds = time.perf_counter() - start
        kept = items[-1].kept_rows
        assert kept == state["unit_rows"] // 2 and len(items) - 1 == state["unit_rows"] - kept  # the rest is read
    finally:
        output.release()
    return {
        "import_peak_mib": imported, "plan_seconds": plan_seconds, "plan_peak_mib": planned,
        "first_unit_seconds": unit_seconds, "first_unit_peak_mib": _peak_mib(), "tasks": len(redo),
    }


def child_old(state: dict) -> dict:
    import pickle
    from pathlib import Path

    from ramtag.data.layout import OutputLayout

    imported = _peak_mib()
    work = Path(state["old_work"])
    layout = OutputLayout(work.parent / "tags", "dataset", work, run=1, extends_output=False)
    start = time.perf_counter()
    keys = layout.finished_keys()
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    assert len(keys) == state["old_rows"], (len(keys), state["old_rows"])
    start = time.perf_counter()
    pickled = len(pickle.dumps(frozenset(keys)))  # what ShardDataset sent each DataLoader worker
    return {
        "import_peak_mib": imported, "plan_seconds": seconds, "plan_peak_mib": peak, "keys": len(keys),
        "pickle_mib": pickled / 2**20, "pickle_seconds": time.perf_counter() - start,
    }


def child_plan(state: dict) -> dict | None:
    from ramtag.data.units import UnitDataset
    from ramtag.engine import dist
    from ramtag.engine.claims import static_share
    from ramtag.engine.output import InputOptions, RunOutput

    dist.setup(device="cpu")
    info = dist.info()
    imported = _peak_mib()
    start = time.perf_counter()
    output = RunOutput.open(
        state["output"], InputOptions([state["manifest"]]), overwrite=True, identity={"bench": "scale"}
    )
    plan_seconds = time.perf_counter() - start
    planned = _peak_mib()
    mine = static_share(output.tasks, info.rank, info.world_size)  # (which unit a rank reads first: any one)
    start = time.perf_counter()
    dataset = UnitDataset(mine[:1], output.work_dir, output.listing, lambda image: image)
    rows = sum(1 for _ in dataset) - 1
    row = {
        "rank": info.rank, "import_peak_mib": imported, "plan_seconds": plan_seconds, "plan_peak_mib": planned,
        "units": len(output.unit_ids), "unit_rows": rows, "first_unit_seconds": time.perf_counter() - start,
        "first_unit_peak_mib": _peak_mib(),
    }
    rows_of_ranks = dist.all_gather_objects(row)
    if info.is_main:
        output.release()
    dist.teardown()
    return {"ranks": rows_of_ranks} if info.is_main else None


def run_child(kind: str, state_dir: Path, torchrun: int = 0) -> dict:
    script = [str(Path(__file__).resolve()), "--child", kind, "--state", str(state_dir)]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
        command = launcher + script
    else:
        command = [sys.executable, *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the parent -----------------------------------------------------------------------------------------------


def check_disk(folder: Path, rows: int, old: bool) -> None:
    need = rows * STATE_BYTES_PER_ROW * (1.7 if old else 1)
    free = shutil.disk_usage(folder).free
    log(f"disk: {free / 2**30:.1f} GiB free in {folder}, this state needs about {need / 2**30:.1f} GiB")
    if free < need * 1.2:
        raise SystemExit(f"not enough disk in {folder} for {rows:,} rows; pass --dir or smaller --rows")


def disk_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def measure_resume(args, root: Path, rows: int) -> dict:
    old = rows <= count(args.old_max_rows)
    check_disk(root.parent, rows, old)
    start = time.perf_counter()
    state = generate_state(root, rows, args.units, labels=list(common.COCO_LABELS), old_design=old,
                           parts_every=args.parts_every)
    generated = time.perf_counter() - start
    size = disk_bytes(root)
    log(f"{rows:,} rows over {args.units:,} units: generated in {generated:.0f} s, {size / 2**30:.2f} GiB")
    new = [run_child("resume", root) for _ in range(args.repeats)]
    olds = [run_child("old", root) for _ in range(max(1, args.repeats - 1))] if old else []
    result = {
        "rows": rows, "units": args.units, "rows_per_unit": state["unit_rows"], "parts_every": args.parts_every,
        "generate_seconds": generated, "state_gib": size / 2**30, "ramtag": new, "old_design": olds,
    }
    for name, samples in (("ramtag", new), ("old_design", olds)):
        for field in ("plan_seconds", "plan_peak_mib", "import_peak_mib", "first_unit_peak_mib", "first_unit_seconds"):
            values = [sample[field] for sample in samples if field in sample]
            if values:
                result[f"{name}_{field}"] = statistics.median(values)
    if not args.keep:
        shutil.rmtree(root)
    return result


def measure_manifest(args, root: Path, rows: int) -> dict:
    check_disk(root.parent, rows // 4, False)
    root.mkdir(parents=True)
    write_manifest(root / "manifest.parquet", rows, 1_000)
    state = {"output": f"{root / 'tags'}/", "manifest": str(root / "manifest.parquet")}
    (root / "state.json").write_text(json.dumps(state))
    samples = [run_child("plan", root, torchrun=2) for _ in range(args.repeats)]
    result: dict = {"rows": rows, "samples": samples}
    for rank in range(2):
        for field in ("plan_seconds", "plan_peak_mib", "import_peak_mib", "first_unit_peak_mib"):
            result[f"rank{rank}_{field}"] = statistics.median(s["ranks"][rank][field] for s in samples)
    result["units"] = samples[0]["ranks"][0]["units"]
    if not args.keep:
        shutil.rmtree(root)
    return result


def old_extrapolation(rows: list[dict]) -> dict | None:
    """The old design's bytes and seconds per key, from the slope between its two largest measured states (or
    the largest alone), scaled to 100M keys: its set grows linearly with the keys."""
    measured = sorted((row for row in rows if row.get("old_design_plan_peak_mib")), key=lambda row: row["rows"])
    if not measured:
        return None
    top = measured[-1]
    low = measured[-2] if len(measured) > 1 else {"old_design_plan_peak_mib": top["old_design_import_peak_mib"],
                                                   "old_design_plan_seconds": 0.0, "old_design": [{"keys": 0}]}
    keys = top["old_design"][0]["keys"] - low["old_design"][0]["keys"]
    per_key = (top["old_design_plan_peak_mib"] - low["old_design_plan_peak_mib"]) * 2**20 / keys
    seconds = (top["old_design_plan_seconds"] - low["old_design_plan_seconds"]) / keys
    rest = 1e8 - top["old_design"][0]["keys"]
    return {
        "from_rows": [row["rows"] for row in measured[-2:]], "bytes_per_key": per_key, "seconds_per_key": seconds,
        "peak_gib_at_100M": (top["old_design_plan_peak_mib"] * 2**20 + per_key * rest) / 2**30,
        "seconds_at_100M": top["old_design_plan_seconds"] + seconds * rest,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        state_dir = Path(args.state)
        state = json.loads((state_dir / "state.json").read_text())
        result = {"resume": child_resume, "old": child_old, "plan": child_plan}[args.child](state)
        if result is not None:
            print(json.dumps(result))
        return
    base = Path(args.dir or tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="ramtag-scale-", dir=base))
    parts = args.parts.split(",")
    name = f"scale.{args.label}" if args.label else "scale"
    payload: dict = {"settings": vars(args), "machine": common.machine_info(torch.device("cpu"))}
    try:
        if "resume" in parts:
            payload["resume"] = []
            for rows in map(count, args.rows.split(",")):
                payload["resume"].append(measure_resume(args, work / f"resume-{rows}", rows))
                log(json.dumps({k: v for k, v in payload["resume"][-1].items() if k not in ("ramtag", "old_design")}))
                common.write_results(name, payload, torch.device("cpu"), quick=args.quick)  # a size at a time
            payload["old_design_extrapolated"] = old_extrapolation(payload["resume"])
        if "manifest" in parts:
            payload["manifest"] = measure_manifest(args, work / "manifest", count(args.manifest_rows))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    path = common.write_results(name, payload, torch.device("cpu"), quick=args.quick)
    columns = ["rows", "rows_per_unit", "ramtag_plan_seconds", "ramtag_plan_peak_mib", "ramtag_import_peak_mib",
               "ramtag_first_unit_peak_mib", "old_design_plan_seconds", "old_design_plan_peak_mib"]
    common.print_table("Resume planning (medians)", payload.get("resume", []), columns)
    if payload.get("old_design_extrapolated"):
        print("\nold design extrapolated:", json.dumps(payload["old_design_extrapolated"]))
    if "manifest" in payload:
        manifest = payload["manifest"]
        print(f"\nManifest planning, {manifest['rows']:,} rows, {manifest['units']} units, 2 ranks (medians):")
        for rank in range(2):
            print(f"  rank {rank}: " + ", ".join(
                f"{field} {manifest[f'rank{rank}_{field}']:.1f}"
                for field in ("plan_seconds", "plan_peak_mib", "import_peak_mib", "first_unit_peak_mib")))
    log(f"results: {path}")


if __name__ == "__main__":
    main()
