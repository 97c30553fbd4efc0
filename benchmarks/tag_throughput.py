"""Tagging throughput: `ramtag tag` end to end vs the bare RAM forward vs a bare open_clip `encode_image` loop.

Same images (photo-like 640x480 JPEGs made here), same model, batch size and device for every arm:

- `encode_image`: `clip.encode_image` on tensors already decoded in memory (the backbone's limit);
- `forward`: RAM (`Runtime.score`) on the same tensors, label features computed once (the pipeline's limit);
- `tag`: `ramtag.engine.tag.run_tag` (what `ramtag tag` runs) on the JPEG folder, writing Parquet: decoding
  in DataLoader workers, scoring, tag selection, the background writer and the final assembly.

Models: a ViT-B/16-sized CLIP with random weights (RAM with adapters at layers 9-11, and training-free RAM,
sharing one backbone), and the demo model (its bundled weights if present, else a random CLIP of its shape;
training-free, as `--model demo` runs). Arms are interleaved in rotating order; figures are medians.

With --cli, each model that can be saved as a self-contained checkpoint is also run once through the real
command (`python -m ramtag tag --checkpoint ...`) in a subprocess, for its startup cost and its own img/s.

    python benchmarks/tag_throughput.py            # a few minutes on 2 idle cores
    python benchmarks/tag_throughput.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
from common import log
from stages import stage_breakdown

TARGETS = {
    "tag_over_forward_cpu": 0.9,
    "tag_over_forward_gpu": 0.95,
    "forward_over_encode_image_adapters": 1.35,
    "forward_over_encode_image_training_free": 1.2,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all usable cores)")
    parser.add_argument("--models", default="demo,vitb", help="comma-separated: demo, vitb")
    parser.add_argument("--vitb-images", type=int, default=None, help="default 24 on CPU, 512 on GPU")
    parser.add_argument("--demo-images", type=int, default=None, help="default 128 on CPU, 2048 on GPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 64 on GPU")
    parser.add_argument("--labels", type=int, default=80, help="vocabulary size (COCO's 80 names, padded)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="decoding workers of the tag arm (default: ramtag's)")
    parser.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="as ramtag's (auto: bf16 on CUDA)"
    )
    parser.add_argument(
        "--fast-decode", action="store_true", help="also time the tag arm with --fast-decode (JPEG draft)"
    )
    parser.add_argument(
        "--cli", action="store_true", help="also run `python -m ramtag tag --checkpoint` once per model"
    )
    parser.add_argument("--no-breakdown", action="store_true", help="skip the serial per-stage breakdown")
    parser.add_argument("--quick", action="store_true", help="tiny counts, 2 repeats: checks the script runs")
    parser.add_argument(
        "--label", default=None, help="suffix of the results file (e.g. passive for an OMP_WAIT_POLICY run)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    args = parser.parse_args()
    return args


def defaults(args: argparse.Namespace, device: torch.device) -> None:
    gpu = device.type == "cuda"
    if args.quick:
        args.vitb_images = args.vitb_images or (64 if gpu else 8)
        args.demo_images = args.demo_images or (256 if gpu else 32)
        args.repeats = min(args.repeats, 2)
    args.vitb_images = args.vitb_images or (512 if gpu else 24)
    args.demo_images = args.demo_images or (2048 if gpu else 128)
    args.batch_size = args.batch_size or (64 if gpu else 8)


def build_family(name: str):
    """(clip, {variant: RamModel}, note) for one model family."""
    if name == "vitb":
        clip = common.vitb_clip()
        variants = {
            "vitb_adapters": common.ram_model(clip, trained=True),
            "vitb_training_free": common.ram_model(clip, trained=False),
        }
        return clip, variants, "ViT-B/16 (QuickGELU) with random weights; adapters at layers 9, 10, 11"
    if name == "demo":
        clip, bundled = common.demo_clip()
        variants = {"demo": common.ram_model(clip, trained=False, backbone="demo")}
        note = "bundled demo CLIP" if bundled else "demo-shaped CLIP with random weights (bundled demo weights absent)"
        return clip, variants, note
    raise SystemExit(f"unknown model family {name!r} (demo, vitb)")


def run_cli(checkpoint: Path, folder: Path, labels: Path, out: Path, args, device: torch.device) -> dict:
    command = [
        sys.executable,
        "-m",
        "ramtag",
        "tag",
        str(folder),
        "--checkpoint",
        str(checkpoint),
        "--labels",
        str(labels),
        "-o",
        str(out),
        "--overwrite",
        "-b",
        str(args.batch_size),
        "--device",
        str(device),
        "--precision",
        args.precision,
    ]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=common.REPO, env={**os.environ, "PYTHONPATH": str(common.REPO)}
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    found = re.search(r"([0-9.]+) img/s", done.stderr)
    return {"wall_seconds": wall, "reported_images_per_second": float(found.group(1)) if found else None}


def bench_family(family: str, args, device: torch.device, work: Path) -> list[dict]:
    from ramtag.engine.runtime import autocast_dtype
    from ramtag.engine.tag import TagOptions, run_tag
    from ramtag.engine.vocabulary import load_vocabulary

    count = args.vitb_images if family == "vitb" else args.demo_images
    folder = work / f"images_{family}"
    paths = common.make_jpegs(folder, count)
    labels_file = common.write_labels(work / f"labels_{args.labels}.txt", args.labels)
    labels = common.label_names(args.labels)
    clip, variants, note = build_family(family)
    clip = clip.to(device)
    runtimes = {name: common.runtime_for(model, device, name) for name, model in variants.items()}
    first = next(iter(runtimes.values()))
    # One decoding shared by every tensor arm: all variants of a family use the same preprocessing.
    batches = [b.to(device) for b in common.decoded_batches(paths, first.transform(), args.batch_size)]
    # load_vocabulary also fills the label-feature cache, so the tag arm never encodes labels.
    features = {name: load_vocabulary(rt, str(labels_file)).features.to(device) for name, rt in runtimes.items()}

    def encode_image():
        with torch.inference_mode(), common.autocast(device, args.precision):
            for batch in batches:
                clip.encode_image(batch)

    def forward(name):
        runtime = runtimes[name]
        dtype = autocast_dtype(args.precision, device)
        def run():
            for batch in batches:
                runtime.score(batch, features[name], dtype)
        return run

    def tag(name, fast_decode=False):
        runtime = runtimes[name]
        options = TagOptions(inputs=[str(folder)], labels=str(labels_file), output=str(work / f"out_{name}.parquet"),
                             batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                             overwrite=True, quiet=True, fast_decode=fast_decode)
        return lambda: run_tag(options, runtime)

    arms = {"encode_image": encode_image}
    for name in runtimes:
        arms[f"forward:{name}"] = forward(name)
        arms[f"tag:{name}"] = tag(name)
        if args.fast_decode:
            arms[f"tag_fast_decode:{name}"] = tag(name, fast_decode=True)

    log(f"[{family}] {note}; {count} images, batch {args.batch_size}, {args.labels} labels, {args.repeats} rounds")
    with torch.inference_mode(), common.autocast(device, args.precision):
        clip.encode_image(batches[0])  # warm-up: allocator, kernels
        for name, runtime in runtimes.items():
            runtime.model(batches[0], features[name])
    samples = common.interleave(arms, args.repeats, warmup=0, device=device, log=log)

    rows = []
    encode = samples["encode_image"]
    for name, runtime in runtimes.items():
        fwd, tagged = samples[f"forward:{name}"], samples[f"tag:{name}"]
        row = {
            "model": name,
            "note": note,
            "images": count,
            "batch_size": args.batch_size,
            "labels": args.labels,
            "encode_image_images_per_second": count / common.summary(encode)["median"],
            "forward_images_per_second": count / common.summary(fwd)["median"],
            "tag_images_per_second": count / common.summary(tagged)["median"],
            "tag_over_forward": common.summary(fwd)["median"] / common.summary(tagged)["median"],
            "tag_over_forward_paired": 1 / common.paired_ratio(tagged, fwd),
            "forward_over_encode_image": common.summary(fwd)["median"] / common.summary(encode)["median"],
            "forward_over_encode_image_paired": common.paired_ratio(fwd, encode),
            "seconds": {"encode_image": encode, "forward": fwd, "tag": tagged},
        }
        if args.fast_decode:
            fast = samples[f"tag_fast_decode:{name}"]
            row["tag_fast_decode_images_per_second"] = count / common.summary(fast)["median"]
            row["seconds"]["tag_fast_decode"] = fast
        if not args.no_breakdown:
            log(f"  stage breakdown: {name}")
            row["stages"] = stage_breakdown(runtime, folder, labels, batches, features[name], work, args.precision)
        if args.cli:
            row["cli"] = cli_run(family, name, variants[name], folder, labels_file, args, device, work)
        rows.append(row)
    return rows


def cli_run(family, name, model, folder, labels_file, args, device, work) -> dict:
    from ramtag.model.checkpoint import save_checkpoint

    if family != "vitb":
        # open_clip rebuilds a stored backbone from OpenAI-shaped tensors only (QuickGELU, 64-wide heads);
        # the demo shape differs, and the bundled demo is reached with --model demo instead.
        return {"skipped": "demo-shaped backbone cannot be stored in a checkpoint; use --model demo once bundled"}
    checkpoint = save_checkpoint(work / f"{name}.safetensors", model.cpu(), include_backbone=True)
    model.to(device)
    log(f"  CLI run: {name}")
    return run_cli(checkpoint, folder, labels_file, work / f"cli_{name}.parquet", args, device)


def targets_met(rows: list[dict], device: torch.device) -> dict:
    met = {}
    tag_target = TARGETS["tag_over_forward_gpu" if device.type == "cuda" else "tag_over_forward_cpu"]
    for row in rows:
        if not row["model"].startswith("vitb"):
            continue
        key = "adapters" if row["model"].endswith("adapters") else "training_free"
        limit = TARGETS[f"forward_over_encode_image_{key}"]
        met[row["model"]] = {
            f"tag_over_forward >= {tag_target}": row["tag_over_forward"] >= tag_target,
            f"forward_over_encode_image <= {limit}": row["forward_over_encode_image"] <= limit,
        }
    return met


def main() -> None:
    args = parse_args()
    device = common.pick_device(args.device)
    threads = common.set_threads(args.threads)
    defaults(args, device)
    machine = common.machine_info(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ramtag-bench-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["RAMTAG_CACHE_DIR"] = str(work / "cache")  # never touch the user's feature cache
        for family in args.models.split(","):
            rows += bench_family(family.strip(), args, device, work)
    payload = {
        "benchmark": "tag_throughput",
        "machine": machine,
        "threads": threads,
        "settings": vars(args) | {"keep": str(args.keep)},
        "targets": TARGETS,
        "targets_met": targets_met(rows, device),
        "results": rows,
    }
    path = common.write_results(
        "tag_throughput" + (f".{args.label}" if args.label else ""), payload, device, quick=args.quick
    )
    common.print_table(
        f"Tagging throughput (images/s, medians of {args.repeats} interleaved rounds; {device}, {threads} threads)",
        [
            {
                k: r[k]
                for k in (
                    "model",
                    "images",
                    "batch_size",
                    "encode_image_images_per_second",
                    "forward_images_per_second",
                    "tag_images_per_second",
                    "tag_over_forward",
                    "forward_over_encode_image",
                )
            }
            for r in rows
        ],
    )
    if not args.no_breakdown:
        common.print_table("Where the time goes (serial, one process; share of the sum of stages)", [
            {"model": r["model"], **{k: v for k, v in r["stages"].items()}} for r in rows])
    print(f"\ntargets: {payload['targets_met']}\nwritten: {path}")


if __name__ == "__main__":
    main()
