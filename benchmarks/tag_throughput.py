"""Tagging throughput: `ramtag tag` end to end vs the bare RAM forward vs a bare open_clip `encode_image` loop.

Same images (photo-like 640x480 JPEGs made here), same model, batch size and device for every arm:

- `encode_image`: `clip.encode_image` on tensors already decoded in memory (the backbone's limit);
- `forward`: RAM (`Runtime.score`) on the same tensors, label features computed once (the pipeline's limit);
- `tag`: `ramtag.engine.tag.run_tag` (what `ramtag tag` runs) on the JPEG folder, writing Parquet: decoding
  (`--decode auto`: batched on the GPU on CUDA, in DataLoader workers on the CPU), scoring, tag selection, the
  background writer and the final assembly;
- with `--other-decode`, `tag_cpu_decode` (on CUDA) / `tag_gpu_decode` (on the CPU): the same with the other
  decoder. On CUDA that is
  PIL in DataLoader workers, one per usable core but one (`--cpu-decode-workers`); on the CPU it is the batched
  torchvision decoder running on the CPU (`--device cpu --decode gpu`), which keeps that path exercised;
- with `--compile`, `forward_compiled` and `tag_compiled`: the `forward` and `tag` arms with the image forward
  through torch.compile (`ramtag tag --compile`). Compiling happens once per model, before the timed rounds;
  its seconds are reported, and so is how many images a run must tag before the compiled forward wins them back.

Models: a ViT-B/16-sized CLIP with random weights (RAM with adapters at layers 9-11, and training-free RAM,
sharing one backbone), and the demo model (its bundled weights if present, else a random CLIP of its shape;
training-free, as `--model demo` runs). Arms are interleaved in rotating order; figures are medians.

With --cli, each model that can be saved as a self-contained checkpoint is also run once through the real
command (`python -m ramtag tag --checkpoint ...`) in a subprocess, for its startup cost and its own img/s.

    python benchmarks/tag_throughput.py            # a few minutes on 2 idle cores
    python benchmarks/tag_throughput.py --quick    # a smoke run
    python benchmarks/tag_throughput.py --models vitb --variants vitb_adapters --compile --label compile
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
    parser.add_argument(
        "--variants", default=None, help="comma-separated model variants to run (e.g. vitb_adapters; default: all)"
    )
    parser.add_argument(
        "--other-decode",
        action="store_true",
        help="also time the tag arm with the other decoder (CPU workers on CUDA; the batched decoder on a CPU)",
    )
    parser.add_argument(
        "--cpu-decode-workers",
        type=int,
        default=None,
        help="decoding workers of the CUDA run's tag_cpu_decode arm (default: usable cores - 1)",
    )
    parser.add_argument("--compile", action="store_true", help="also time the forward and tag arms compiled")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled arms (eager: dynamo only, no code generation; for dry runs)",
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


def build_family(name: str, only: set[str] | None = None):
    """(clip, {variant: RamModel}, note) for one model family; ``only`` keeps those variants."""
    clip, variants, note = _family(name)
    if only is not None:
        variants = {key: model for key, model in variants.items() if key in only}
    return clip, variants, note


def _family(name: str):
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


def break_even_images(compile_seconds: float | None, eager_rate: float, compiled_rate: float) -> float | None:
    """Images a run must tag before compiling pays for itself (None when the compiled forward is not faster)."""
    if compile_seconds is None or compiled_rate <= eager_rate:
        return None
    return compile_seconds / (1 / eager_rate - 1 / compiled_rate)


def bench_family(family: str, args, device: torch.device, work: Path) -> list[dict]:
    from ramtag.engine.device_feed import decodes_on_device
    from ramtag.engine.runtime import autocast_dtype
    from ramtag.engine.tag import TagOptions, run_tag, usable_cores
    from ramtag.engine.vocabulary import load_vocabulary

    only = set(args.variants.split(",")) if args.variants else None
    auto_decode = "gpu" if decodes_on_device("auto", device) else "cpu"
    other_decode = "cpu" if auto_decode == "gpu" else "gpu"
    other_workers = args.workers
    if other_decode == "cpu" and args.cpu_decode_workers is not None:
        other_workers = args.cpu_decode_workers
    elif other_decode == "cpu" and other_workers is None:
        other_workers = max(1, usable_cores() - 1)  # the "CPU decoding on 16 cores"; ramtag's default is 8

    count = args.vitb_images if family == "vitb" else args.demo_images
    folder = work / f"images_{family}"
    paths = common.make_jpegs(folder, count)
    labels_file = common.write_labels(work / f"labels_{args.labels}.txt", args.labels)
    labels = common.label_names(args.labels)
    clip, variants, note = build_family(family, only)
    if not variants:
        log(f"[{family}] no variant of {sorted(only)}; skipped")
        return []
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

    dtype = autocast_dtype(args.precision, device)
    # Compiled forwards are made (not yet compiled) here; run_tag(compile=True) finds them in the runtime's cache.
    compiled = (
        {name: rt.compiled_vision(args.batch_size, log, backend=args.compile_backend) for name, rt in runtimes.items()}
        if args.compile
        else {}
    )

    def forward(name, vision=None):
        runtime = runtimes[name]

        def run():
            for batch in batches:
                runtime.score(batch, features[name], dtype, vision)

        return run

    def tag(name, fast_decode=False, decode="auto", workers=args.workers, compile_forward=False):
        runtime = runtimes[name]
        options = TagOptions(
            inputs=[str(folder)],
            labels=str(labels_file),
            output=str(work / f"out_{name}.parquet"),
            batch_size=args.batch_size,
            workers=workers,
            precision=args.precision,
            overwrite=True,
            quiet=True,
            fast_decode=fast_decode,
            decode=decode,
            compile=compile_forward,
        )
        return lambda: run_tag(options, runtime)

    arms = {"encode_image": encode_image}
    for name in runtimes:
        arms[f"forward:{name}"] = forward(name)
        arms[f"tag:{name}"] = tag(name)
        if args.other_decode:
            arms[f"tag_{other_decode}_decode:{name}"] = tag(name, decode=other_decode, workers=other_workers)
        if args.fast_decode:
            arms[f"tag_fast_decode:{name}"] = tag(name, fast_decode=True)
        if args.compile:
            arms[f"forward_compiled:{name}"] = forward(name, compiled[name])
            arms[f"tag_compiled:{name}"] = tag(name, compile_forward=True)

    log(f"[{family}] {note}; {count} images, batch {args.batch_size}, {args.labels} labels, {args.repeats} rounds")
    with torch.inference_mode(), common.autocast(device, args.precision):
        clip.encode_image(batches[0])  # warm-up: allocator, kernels
        for name, runtime in runtimes.items():
            runtime.model(batches[0], features[name])
    for name in compiled:  # compiling, outside the timed rounds; its seconds are reported
        log(f"  compiling {name} ({args.compile_backend}, batch {args.batch_size})")
        # through run_tag first: on a CPU it sets torch's thread count for its workers, and dynamo would compile
        # again for a forward arm run before it at another count
        arms[f"tag_compiled:{name}"]()
        arms[f"forward_compiled:{name}"]()
        common.synchronize(device)
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
        row["tag_decode"] = auto_decode
        if args.other_decode:
            other = samples[f"tag_{other_decode}_decode:{name}"]
            row[f"tag_{other_decode}_decode_workers"] = other_workers
            row[f"tag_{other_decode}_decode_images_per_second"] = count / common.summary(other)["median"]
            row[f"tag_{other_decode}_decode_over_forward"] = (
                common.summary(fwd)["median"] / common.summary(other)["median"]
            )
            row["seconds"][f"tag_{other_decode}_decode"] = other
        if args.compile:
            row.update(compiled_figures(compiled[name], samples, name, count))
            row["seconds"]["forward_compiled"] = samples[f"forward_compiled:{name}"]
            row["seconds"]["tag_compiled"] = samples[f"tag_compiled:{name}"]
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


def compiled_figures(vision, samples: dict, name: str, count: int) -> dict:
    fwd, fwd_compiled = samples[f"forward:{name}"], samples[f"forward_compiled:{name}"]
    tagged, tagged_compiled = samples[f"tag:{name}"], samples[f"tag_compiled:{name}"]
    eager_rate = count / common.summary(fwd)["median"]
    compiled_rate = count / common.summary(fwd_compiled)["median"]
    return {
        "compile_backend": getattr(vision, "backend", None),
        "compile_seconds": vision.compile_seconds,
        "compile_failure": vision.failure,
        "forward_compiled_images_per_second": compiled_rate,
        "tag_compiled_images_per_second": count / common.summary(tagged_compiled)["median"],
        "forward_compiled_speedup": common.summary(fwd)["median"] / common.summary(fwd_compiled)["median"],
        "forward_compiled_speedup_paired": common.paired_ratio(fwd, fwd_compiled),
        "tag_compiled_speedup": common.summary(tagged)["median"] / common.summary(tagged_compiled)["median"],
        "tag_compiled_speedup_paired": common.paired_ratio(tagged, tagged_compiled),
        "compile_break_even_images": break_even_images(vision.compile_seconds, eager_rate, compiled_rate),
    }


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
    shown = (
        "model",
        "images",
        "batch_size",
        "encode_image_images_per_second",
        "forward_images_per_second",
        "tag_images_per_second",
        "tag_decode",
        "tag_cpu_decode_images_per_second",
        "tag_gpu_decode_images_per_second",
        "tag_over_forward",
        "forward_over_encode_image",
    )
    common.print_table(
        f"Tagging throughput (images/s, medians of {args.repeats} interleaved rounds; {device}, {threads} threads)",
        [{k: r[k] for k in shown if k in r} for r in rows],
    )
    if args.compile:
        compiled = (
            "model",
            "compile_backend",
            "compile_seconds",
            "forward_compiled_images_per_second",
            "forward_compiled_speedup",
            "tag_compiled_images_per_second",
            "tag_compiled_speedup",
            "compile_break_even_images",
            "compile_failure",
        )
        common.print_table(
            "--compile (speed-ups are eager time / compiled time, same run)",
            [{k: r[k] for k in compiled} for r in rows],
        )
    if not args.no_breakdown:
        common.print_table(
            "Where the time goes (serial, one process; share of the sum of stages)",
            [{"model": r["model"], **{k: v for k, v in r["stages"].items()}} for r in rows],
        )
    print(f"\ntargets: {payload['targets_met']}\nwritten: {path}")


if __name__ == "__main__":
    main()
