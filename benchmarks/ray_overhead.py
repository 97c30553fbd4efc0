"""What `ramtag tag --ray local` costs against one process and torchrun with 2 ranks, on the same images.

Arms, each a fresh `ramtag tag` command on the same synthetic 64x64 images (`ramtag data synth`) with the demo model,
on the CPU, rounds in rotating order:

- `one`: one process (its default decoding workers);
- `ray`: `--ray local` (the command starts its own Ray, one scoring actor, decoding tasks);
- `torchrun2`: `torchrun --standalone --nproc-per-node 2` (gloo, one OpenMP thread per rank on 2 cores);
- `ray_init`: only `import ray; ray.init()` and `ray.shutdown()` in a fresh interpreter: Ray's own start-up,
  which the `ray` arm pays inside its wall time.

Each tagging arm runs at two sizes (default 25 and 50 images). Reported, each as a ratio to `one` in the same
run (never an absolute time as the claim), at the larger size: the command's wall time (Python start, model load,
planning, tagging, assembly) and its tagging time (the command's own summary line: from its first batch to the
assembled table, so without Python start, model load and, for Ray, `ray.init`; it prints img/s to 0.1, which
bounds its precision). The cost of each further image is the difference of the two sizes' tagging times, again
as a ratio to one process's: it needs sizes far enough apart that the difference outgrows the run-to-run noise
of Ray's fixed cost (at 25 and 50 demo images on 2 shared cores it does not; `--sizes 50,2000`). The fixed
overhead is also counted in images: how many images the one-process run tags in the extra wall time, which
says from what size Ray's start-up stops dominating.

    python benchmarks/ray_overhead.py              # 25 and 50 images, 3 rounds: about 10 min on 2 shared cores
    python benchmarks/ray_overhead.py --quick      # 6 and 12 images, 1 round
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
from common import log

SUMMARY = re.compile(r"tagged (\d+) images, (\d+) failed.*?([0-9.]+) img/s")
TAGGING_ARMS = ("one", "ray", "torchrun2")
RAY_INIT = (
    "import logging, ray; ray.init(num_cpus={cores}, include_dashboard=False, logging_level=logging.WARNING); "
    "ray.shutdown()"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="25,50", help="image counts; two give the cost of each further image")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds = "6,12", 1
    args.sizes = sorted(int(size) for size in args.sizes.split(","))
    return args


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tag_command(arm: str, images: Path, labels: Path, out: Path, batch_size: int) -> list[str]:
    tag = ["tag", str(images), "--labels", str(labels), "--model", "demo", "-o", str(out), "--overwrite",
           "--device", "cpu", "-b", str(batch_size)]
    if arm == "torchrun2":
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
        launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        return launcher + ["--standalone", "--nproc-per-node", "2", "-m", "ramtag", *tag]
    command = [sys.executable, "-m", "ramtag", *tag]
    return command + (["--ray", "local", "--ray-gpus-per-actor", "0"] if arm == "ray" else [])


def run_arm(arm: str, images: Path, labels: Path, work: Path, batch_size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(common.REPO)}  # Ray's workers inherit it and import this ramtag
    if arm == "torchrun2":
        env["OMP_NUM_THREADS"] = str(max(1, cores() // 2))
    if arm == "ray_init":
        command = [sys.executable, "-c", RAY_INIT.format(cores=cores())]
    else:
        command = tag_command(arm, images, labels, work / f"{arm}.parquet", batch_size)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=work, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{arm} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    sample = {"wall_seconds": wall}
    if arm != "ray_init":
        found = SUMMARY.findall(done.stderr)
        if not found:
            raise RuntimeError(f"{arm}: no summary line in its stderr:\n{done.stderr[-2000:]}")
        tagged, failed, rate = found[-1]
        sample.update(images=int(tagged) + int(failed), tagging_seconds=(int(tagged) + int(failed)) / float(rate))
    return sample


def main() -> None:
    args = parse_args()
    device = torch.device("cpu")
    work = Path(tempfile.mkdtemp(prefix="ramtag-ray-overhead-"))
    try:
        from ramtag.data.synth import write_dataset

        log(f"[ray_overhead] {args.sizes} synthetic images, {args.rounds} round(s), {cores()} cores")
        folders = {}
        for size in args.sizes:
            write_dataset(work / f"synth{size}", n=size, seed=0, formats={"images"})  # as `ramtag data synth` does
            folders[size] = work / f"synth{size}" / "images"
        labels = work / f"synth{args.sizes[0]}" / "all.txt"
        runs = [(arm, size) for arm in TAGGING_ARMS for size in args.sizes] + [("ray_init", 0)]
        run_arm("one", folders[args.sizes[0]], labels, work, args.batch_size)  # warm-up: label cache, page cache
        samples: dict[str, list[dict]] = {f"{arm}@{size}": [] for arm, size in runs}
        for round_index in range(args.rounds):
            shift = round_index % len(runs)
            for arm, size in runs[shift:] + runs[:shift]:
                sample = run_arm(arm, folders.get(size), labels, work, args.batch_size)
                samples[f"{arm}@{size}"].append(sample)
                log(f"  round {round_index + 1}/{args.rounds} {arm}@{size}: {sample}")
        payload = {"settings": vars(args), "machine": common.machine_info(device), "samples": samples,
                   "rows": rows(samples, args.sizes)}
        common.print_table(f"Ray local vs one process vs torchrun x2 (CPU, {cores()} cores)", payload["rows"])
        log(f"wrote {common.write_results('ray_overhead', payload, device, args.quick)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _median(found: list[dict], name: str) -> float:
    return common.summary([sample[name] for sample in found])["median"]


def rows(samples: dict[str, list[dict]], sizes: list[int]) -> list[dict]:
    """Per arm, as ratios to `one` in the same run: medians over the rounds (paired, same-round ratios beside
    them) at the largest size; the cost of each further image, from the two sizes' tagging times; and the
    extra wall time counted in images that the one-process run tags in that time."""
    small, large = sizes[0], sizes[-1]
    one = samples[f"one@{large}"]
    one_image = _median(one, "tagging_seconds") / large
    one_step = _median(samples[f"one@{large}"], "tagging_seconds") - _median(samples[f"one@{small}"], "tagging_seconds")
    out = []
    for arm in (*TAGGING_ARMS, "ray_init"):
        found = samples[f"{arm}@{0 if arm == 'ray_init' else large}"]
        wall = [sample["wall_seconds"] for sample in found]
        row = {
            "arm": arm,
            "wall_vs_one": _median(found, "wall_seconds") / _median(one, "wall_seconds"),
            "wall_vs_one_paired": common.paired_ratio(wall, [sample["wall_seconds"] for sample in one]),
        }
        if arm != "ray_init":
            row["tagging_vs_one"] = _median(found, "tagging_seconds") / _median(one, "tagging_seconds")
            if small != large and one_step > 0:
                step = _median(found, "tagging_seconds") - _median(samples[f"{arm}@{small}"], "tagging_seconds")
                row["per_image_vs_one"] = step / one_step
            row["extra_wall_in_images"] = (_median(found, "wall_seconds") - _median(one, "wall_seconds")) / one_image
        out.append(row)
    return out


if __name__ == "__main__":
    main()
