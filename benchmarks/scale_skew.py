"""Ranks on skewed shards: units claimed from torch.distributed's store vs the old static split.

Two torchrun ranks (gloo, one thread and one DataLoader worker each) tag WebDataset shards of skewed sizes: the
first shard holds 10x the images of each of the others. Static assignment (``RAMTAG_STATIC_UNITS=1``, a switch
kept for this benchmark) gives rank ``r`` the shards ``r, r+2, ...``, so rank 0 reads the big shard *and* half
of the small ones while rank 1 idles at the end; claimed, the rank on the big shard takes fewer of the rest.
Both arms run in the same invocation, in rotating order, ``--rounds`` times.

Reported per arm: the command's wall time (start-up and model loading included), the tagging time (rank 0's
summary: from the first batch to the assembled output, so it ends with the slower rank), the images each rank
tagged (from the ledger) and the ratio static / dynamic, both as a ratio of medians and as the median of
per-round ratios.

    python benchmarks/scale_skew.py              # about 5 minutes on 2 shared cores
    python benchmarks/scale_skew.py --quick
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import common
from common import log


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=16, help="images per small shard (the big one holds 10x)")
    parser.add_argument("--small-shards", type=int, default=20)
    parser.add_argument("--skew", type=int, default=10, help="the big shard's size in small shards")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.small, args.small_shards, args.rounds = 4, 6, 1
    return args


def write_shards(folder: Path, images: list[Path], small: int, small_shards: int, skew: int) -> list[str]:
    """Shard 0 of ``skew * small`` images, then ``small_shards`` of ``small``; images are reused under new keys."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [skew * small] + [small] * small_shards
    shards, taken = [], 0
    for index, size in enumerate(sizes):
        path = folder / f"shard{index:03d}.tar"
        with tarfile.open(path, "w") as archive:
            for item in range(size):
                data = images[(taken + item) % len(images)].read_bytes()
                info = tarfile.TarInfo(f"s{index:03d}-{item:04d}.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        taken += size
        shards.append(str(path))
    return shards


def images_per_rank(work_dir: Path) -> dict[int, int]:
    from ramtag.data.ledger import latest_entries

    counts: Counter = Counter()
    for entry in latest_entries(work_dir).values():
        counts[entry.rank] += entry.rows
    return {rank: counts[rank] for rank in sorted(counts)}


def torchrun_tag(shards: list[str], labels: Path, out: Path, args, static: bool) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ramtag", "tag", *shards, "--model", "demo", "--labels", str(labels), "-o", str(out),
               "--overwrite", "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(common.REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RAMTAG_STATIC_UNITS", None)
    if static:
        env["RAMTAG_STATIC_UNITS"] = "1"
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{done.stderr[-3000:]}")
    found = re.findall(r"tagged (\d+) images, \d+ failed.*?([0-9.]+) img/s", done.stderr)
    tagged, rate = int(found[-1][0]), float(found[-1][1])
    per_rank = images_per_rank(out.with_name(f".{out.name}.parts"))
    return {"wall_seconds": wall, "tagging_seconds": tagged / rate, "images": tagged, "images_per_rank": per_rank}


def main() -> None:
    args = parse_args()
    device = torch.device("cpu")
    machine = common.machine_info(device)
    payload: dict = {"benchmark": "scale_skew", "machine": machine, "settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="ramtag-skew-") as scratch:
        work = Path(scratch)
        os.environ["RAMTAG_CACHE_DIR"] = str(work / "cache")
        images = common.make_jpegs(work / "jpegs", args.skew * args.small)
        shards = write_shards(work / "shards", images, args.small, args.small_shards, args.skew)
        labels = common.write_labels(work / "labels.txt", 80)
        log(f"{len(shards)} shards: one of {args.skew * args.small} images, {args.small_shards} of {args.small}")
        torchrun_tag(shards, labels, work / "warm.parquet", args, static=False)  # fills the label cache
        arms = {"dynamic": False, "static": True}
        samples: dict[str, list[dict]] = {name: [] for name in arms}
        names = list(arms)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                result = torchrun_tag(shards, labels, work / f"{name}.parquet", args, static=arms[name])
                samples[name].append(result)
                log(f"  round {round_index + 1}/{args.rounds} {name}: {result}")
    rows = []
    for name in names:
        wall = [s["wall_seconds"] for s in samples[name]]
        tagging = [s["tagging_seconds"] for s in samples[name]]
        rows.append({
            "assignment": name,
            "images per rank (last round)": " / ".join(map(str, samples[name][-1]["images_per_rank"].values())),
            "tagging s (median)": common.summary(tagging)["median"],
            "wall s (median)": common.summary(wall)["median"],
        })
    ratio = {
        key: {
            "of_medians": common.summary([s[key] for s in samples["static"]])["median"]
            / common.summary([s[key] for s in samples["dynamic"]])["median"],
            "paired": common.paired_ratio([s[key] for s in samples["static"]], [s[key] for s in samples["dynamic"]]),
        }
        for key in ("tagging_seconds", "wall_seconds")
    }
    payload.update(samples=samples, table=rows, static_over_dynamic=ratio)
    path = common.write_results("scale_skew", payload, device, quick=args.quick)
    common.print_table("Two ranks on skewed shards (static / dynamic is the time saved by claiming)", rows)
    for key, value in ratio.items():
        print(f"static / dynamic, {key}: {value['of_medians']:.2f} (paired {value['paired']:.2f})")
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
