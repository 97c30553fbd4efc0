"""Scaling: processes (torchrun), vocabulary size and image count.

1. Processes: `torchrun --nproc-per-node N -m ramtag tag ... --checkpoint` on the same images for each N
   (default 1,2 on CPU with gloo, each process given cores/N threads; 1..#GPUs on CUDA), rounds interleaved.
   Reported: the command's own img/s (rank 0's summary: from the first batch to the assembled output) and the
   wall time including start-up and model loading.
2. Vocabulary: the RAM forward (ViT-B/16-sized; adapters and training-free) on the same images at 10 to 10,000
   labels (label features given, as the cache gives them), with KCOT's part; and the one-off cost of encoding
   labels with the text tower (per label).
3. Image count: `run_tag` in-process on N images for several N; a least-squares line gives the fixed cost of
   a run (vocabulary, planning, output assembly) and the cost per image.

Models: `small` is a demo-sized CLIP in OpenAI's shape (random weights; it can be stored in a checkpoint
with its backbone), `vitb` is ViT-B/16 with random weights and adapters at 9-11.

    python benchmarks/scaling.py            # several minutes on 2 idle cores
    python benchmarks/scaling.py --quick
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
from stages import timed_kcot

SMALL_SHAPE = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 192, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
    "quick_gelu": True,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parts", default="processes,vocabulary,images")
    parser.add_argument("--procs", default=None, help="process counts (default 1,2 on CPU; 1..#GPUs on CUDA)")
    parser.add_argument("--proc-models", default="small,vitb")
    parser.add_argument("--proc-images", default="small:256,vitb:32", help="images per model for the process runs")
    parser.add_argument("--vocab-sizes", default="10,100,1000,10000")
    parser.add_argument("--vocab-batch", type=int, default=None, help="images per forward (default 8 CPU, 64 GPU)")
    parser.add_argument("--image-counts", default="small:32,128,512;vitb:8,24", help="MODEL:N,N,...;MODEL:N,...")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 64 on GPU")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--label", default=None, help="suffix of the results file (e.g. passive)")
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args()


def small_clip(seed: int = 0) -> torch.nn.Module:
    import math

    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(**SMALL_SHAPE)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(common.OPENAI_LOGIT_SCALE))
    return clip.eval()


def build(name: str, trained: bool = True):
    if name == "small":
        clip = small_clip()
        return common.ram_model(clip, trained=trained, backbone="small", adapter_layers=(4, 5), prompt_layers=(2, 3))
    if name == "vitb":
        return common.ram_model(common.vitb_clip(), trained=trained)
    raise SystemExit(f"unknown model {name!r} (small, vitb)")


def _pairs(spec: str, separator: str) -> dict[str, str]:
    """`a:1;b:2` (separator ';') or `a:1,b:2` (separator ',') -> {name: value}."""
    return dict(item.split(":", 1) for item in spec.split(separator) if item)


# -- 1. processes -----------------------------------------------------------------------------------------


def torchrun_tag(
    procs: int, checkpoint: Path, folder: Path, labels: Path, out: Path, args, device: torch.device, cores: int
) -> dict:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    command = launcher + ["--standalone", "--nproc-per-node", str(procs), "-m", "ramtag", "tag", str(folder),
                          "--checkpoint", str(checkpoint), "--labels", str(labels), "-o", str(out), "--overwrite",
                          "-b", str(args.batch_size), "--device", "cpu" if device.type == "cpu" else "auto"]
    env = {**os.environ, "PYTHONPATH": str(common.REPO)}
    if device.type == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, cores // procs))
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"torchrun with {procs} processes failed:\n{done.stderr[-3000:]}")
    found = re.findall(r"tagged (\d+) images.*?([0-9.]+) img/s", done.stderr)
    return {"wall_seconds": wall, "images_per_second": float(found[-1][1]) if found else None}


def bench_processes(args, device: torch.device, work: Path) -> list[dict]:
    from ramtag.model.checkpoint import save_checkpoint

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    procs = [int(p) for p in args.procs.split(",")]
    counts = {k: int(v) for k, v in _pairs(args.proc_images, ",").items()}
    labels = common.write_labels(work / "labels.txt", 80)
    rows = []
    for name in args.proc_models.split(","):
        count = counts[name]
        folder = work / f"proc_images_{name}_{count}"
        common.make_jpegs(folder, count)
        checkpoint = save_checkpoint(work / f"{name}.safetensors", build(name), include_backbone=True)
        log(f"[processes] {name}: {count} images, process counts {procs}")
        torchrun_tag(1, checkpoint, folder, labels, work / "warm.parquet", args, device, cores)  # fills the label cache
        samples = {p: [] for p in procs}
        for round_index in range(args.rounds):
            shift = round_index % len(procs)
            for p in procs[shift:] + procs[:shift]:
                samples[p].append(
                    torchrun_tag(p, checkpoint, folder, labels, work / f"out_{p}.parquet", args, device, cores)
                )
                log(f"  round {round_index + 1}/{args.rounds} {p} process(es): {samples[p][-1]}")
        base = None
        for p in procs:
            rate = common.summary([s["images_per_second"] for s in samples[p]])["median"]
            base = base or rate
            rows.append({"model": name, "images": count, "processes": p,
                         "threads_per_process": max(1, cores // p) if device.type == "cpu" else None,
                         "images_per_second": rate, "speedup": rate / base,
                         "wall_seconds": common.summary([s["wall_seconds"] for s in samples[p]])["median"]})
    return rows


# -- 2. vocabulary ----------------------------------------------------------------------------------------


def bench_vocabulary(args, device: torch.device) -> list[dict]:
    import open_clip

    sizes = [int(s) for s in args.vocab_sizes.split(",")]
    adapters = build("vitb", trained=True).to(device)
    free = common.ram_model(adapters.clip, trained=False).to(device)
    dim = int(adapters.clip.visual.proj.shape[1])
    images = torch.randn(args.vocab_batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    features = {size: common.random_label_features(size, dim, seed=size).to(device) for size in sizes}
    measured: dict[tuple[str, int], dict[str, list]] = {}

    def arm(variant: str, model, size: int):
        record = measured.setdefault((variant, size), {"total": [], "kcot": [], "iterations": []})

        def run():
            with timed_kcot(device) as timer, common.stopwatch() as watch:
                model(images, features[size])
                common.synchronize(device)
            record["total"].append(watch["seconds"])
            record["kcot"].append(timer["seconds"])
            record["iterations"].append(timer["iterations"])
        return run

    arms = {
        f"{variant}:{size}": arm(variant, model, size)
        for size in sizes
        for variant, model in (("adapters", adapters), ("training_free", free))
    }
    log(f"[vocabulary] sizes {sizes}, batch {args.vocab_batch}")
    with torch.inference_mode():
        adapters(images[:1], features[sizes[0]])
        common.interleave(arms, args.rounds, warmup=0, device=device)
    rows = []
    for (variant, size), record in sorted(measured.items(), key=lambda item: (item[0][0], item[0][1])):
        total = common.summary(record["total"])["median"]
        rows.append({"variant": variant, "labels": size, "ms_per_image": 1000 * total / args.vocab_batch,
                     "kcot_ms_per_image": 1000 * common.summary(record["kcot"])["median"] / args.vocab_batch,
                     "kcot_share": common.summary([k / t for k, t in zip(record["kcot"], record["total"])])["median"],
                     "sinkhorn_iterations": common.summary(record["iterations"])["median"]})
    for variant in ("adapters", "training_free"):
        first = next(r for r in rows if r["variant"] == variant)
        for row in rows:
            if row["variant"] == variant:
                row["relative_to_smallest"] = row["ms_per_image"] / first["ms_per_image"]
    # One-off: label encoding with the text tower (what the feature cache saves on every later run).
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=adapters.text.context_length)
    tokens = tokenizer([f"A photo of a {n}." for n in common.label_names(64 if device.type == "cpu" else 1024)]).to(
        device
    )
    with torch.inference_mode():
        adapters.encode_labels(tokens[:4])
        common.synchronize(device)
        with common.stopwatch() as watch:
            adapters.encode_labels(tokens)
            common.synchronize(device)
    rows.append({"variant": "label encoding (once per vocabulary, then cached)", "labels": len(tokens),
                 "ms_per_label": 1000 * watch["seconds"] / len(tokens)})
    del adapters, free
    return rows


# -- 3. image count ---------------------------------------------------------------------------------------


def bench_images(args, device: torch.device, work: Path) -> list[dict]:
    from ramtag.engine.tag import TagOptions, run_tag
    from ramtag.engine.vocabulary import load_vocabulary

    labels = common.write_labels(work / "labels.txt", 80)
    rows = []
    for name, spec in _pairs(args.image_counts, ";").items():
        counts = [int(c) for c in spec.split(",")]
        runtime = common.runtime_for(build(name), device, name)
        load_vocabulary(runtime, str(labels))  # fills the cache: every run below reads it, as a rerun would
        paths = common.make_jpegs(work / f"count_images_{name}", max(counts))
        arms = {}
        for count in counts:
            folder = work / f"count_{name}_{count}"
            folder.mkdir(exist_ok=True)
            for path in paths[:count]:
                target = folder / path.name
                if not target.exists():
                    target.symlink_to(path)
            options = TagOptions(
                inputs=[str(folder)],
                labels=str(labels),
                output=str(work / f"count_{name}_{count}.parquet"),
                batch_size=args.batch_size,
                overwrite=True,
                quiet=True,
            )
            arms[count] = (lambda o=options: run_tag(o, runtime))
        log(f"[images] {name}: counts {counts}")
        samples = common.interleave({str(c): f for c, f in arms.items()}, args.rounds, warmup=0, device=device)
        medians = {c: common.summary(samples[str(c)])["median"] for c in counts}
        slope, intercept = _line(list(medians), list(medians.values()))
        for count in counts:
            rows.append(
                {
                    "model": name,
                    "images": count,
                    "seconds": medians[count],
                    "images_per_second": count / medians[count],
                    "fit_fixed_seconds": intercept,
                    "fit_ms_per_image": 1000 * slope,
                }
            )
    return rows


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0
    return slope, mean_y - slope * mean_x


def main() -> None:
    args = parse_args()
    device = common.pick_device(args.device)
    threads = common.set_threads(args.threads)
    gpu = device.type == "cuda"
    args.procs = args.procs or (",".join(str(i) for i in range(1, torch.cuda.device_count() + 1)) if gpu else "1,2")
    args.batch_size = args.batch_size or (64 if gpu else 8)
    args.vocab_batch = args.vocab_batch or (64 if gpu else 8)
    if args.quick:
        args.proc_images, args.image_counts, args.rounds = "small:64,vitb:8", "small:16,64;vitb:8,16", 1
        args.vocab_sizes, args.vocab_batch = "10,1000", 2
    machine = common.machine_info(device)
    parts = args.parts.split(",")
    payload = {"benchmark": "scaling", "machine": machine, "threads": threads, "settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="ramtag-scaling-") as scratch:
        work = Path(scratch)
        os.environ["RAMTAG_CACHE_DIR"] = str(work / "cache")
        if "processes" in parts:
            payload["processes"] = bench_processes(args, device, work)
        if "vocabulary" in parts:
            payload["vocabulary"] = bench_vocabulary(args, device)
        if "images" in parts:
            payload["images"] = bench_images(args, device, work)
    path = common.write_results("scaling" + (f".{args.label}" if args.label else ""), payload, device, quick=args.quick)
    if "processes" in payload:
        common.print_table(f"Processes (torchrun; {device})", payload["processes"])
    if "vocabulary" in payload:
        common.print_table(
            f"Vocabulary size (ViT-B/16-sized RAM forward, batch {args.vocab_batch}; {device}, {threads} threads)",
            payload["vocabulary"],
        )
    if "images" in payload:
        common.print_table(f"Image count (run_tag in-process, batch {args.batch_size})", payload["images"])
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
