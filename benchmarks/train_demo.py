"""What short CPU training adds on the bundled demo CLIP, over several seeds (issue 5's proof that it learns).

For each pair of seeds (training stream, held-out stream) it writes the synthetic data with `ramtag data synth`,
trains each recipe with `ramtag train`, and evaluates the EMA and the live weights with `ramtag eval --baseline`
(ZSL, GZSL and the seen half of GZSL, against training-free RAM and CLIP global scoring on the same images).
It also scores each branch alone (global softmax, KCOT local softmax, their mean) so the fused result can be
read against its parts. Every step is the command a user would run; nothing here is private API except the
per-branch scoring.

    python benchmarks/train_demo.py                      # 5 seed pairs, both recipes, about 10 min on 2 cores
    python benchmarks/train_demo.py --quick              # 1 seed pair, adapters alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from ramtag.engine.runtime import load_runtime  # noqa: E402


def training_free_demo():
    """The untrained demo with the local temperature rule a trained checkpoint uses (the reference's fixed
    τ_loc), so that branch figures compare training, not two rules; `--model demo` alone scores with `matched`."""
    return load_runtime(model="demo", device="cpu", overrides={"local_temperature": "fixed"})
from ramtag.metrics import mean_average_precision  # noqa: E402

from demo_study import arm_scores  # noqa: E402

RECIPES = {
    # tests/engine/test_train_demo.py's recipe: the adapters alone, no adapter tokens or deep prompts.
    "adapters": ["--schedule", "cosine", "--adapter-lr", "3e-3", "--adapter-tokens", "0", "--prompt-tokens", "0"],
    # The reference's parts (adapter tokens, deep prompts) and its rates and schedule.
    "reference": [],
}
PROTOCOLS = ("zsl", "gzsl", "seen")
ARMS = ("model", "training_free", "clip_global")


def ramtag(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "ramtag", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"ramtag {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}")


def protocol_maps(report: dict, arm: str) -> dict[str, float]:
    protocols = report["protocols"]
    gzsl = protocols["gzsl"]["arms"][arm]["metrics"]
    return {"zsl": protocols["zsl"]["arms"][arm]["metrics"]["mAP"], "gzsl": gzsl["mAP"], "seen": gzsl["mAP_seen"]}


def branch_maps(runtime, folder: Path) -> dict[str, float]:
    """mAP of the global, local and fused scores alone, under ZSL (unseen vocabulary, images with an unseen
    label) and GZSL (all labels, all images)."""
    from PIL import Image

    data = json.loads((folder / "labels.json").read_text())["images"]
    everything = (folder / "all.txt").read_text().split("\n")
    unseen = set((folder / "unseen.txt").read_text().split())
    transform = runtime.transform()
    images = torch.stack([transform(Image.open(folder / path).convert("RGB")) for path, _ in data])
    result = {}
    for name, vocabulary in (
        ("zsl", [label for label in everything if label in unseen]),
        ("gzsl", [label for label in everything if label]),
    ):
        targets = np.array([[label in labels for label in vocabulary] for _, labels in data], dtype=np.float32)
        keep = targets.sum(1) > 0 if name == "zsl" else np.ones(len(targets), dtype=bool)
        scores = arm_scores(runtime, images, vocabulary)
        for branch, arm in (("global", "clip_global"), ("local", "ram_local"), ("fused", "ram")):
            result[f"{name}_{branch}"] = mean_average_precision(scores[arm][keep], targets[keep])[0]
    return result


def run_pair(work: Path, train_seed: int, val_seed: int, args) -> dict:
    train, val = work / f"train{train_seed}", work / f"val{val_seed}"
    ramtag("data", "synth", train, "--n", args.train_n, "--seed", train_seed, "--format", "images", "--format", "json")
    ramtag("data", "synth", val, "--n", args.val_n, "--seed", val_seed, "--format", "images", "--format", "json")
    row = {"train_seed": train_seed, "val_seed": val_seed,
           "branches": {"training_free": branch_maps(training_free_demo(), val)}}
    for recipe in args.recipes:
        run = work / f"{recipe}-{train_seed}"
        started = time.perf_counter()
        ramtag("train", train / "seen.json", "--root", train, "--model", "demo", "-o", run, "--batch-size", 32,
               "--epochs", args.epochs, *RECIPES[recipe], "--workers", 0, "--seed", 42)
        row[f"{recipe}_train_seconds"] = round(time.perf_counter() - started, 1)
        for weights, checkpoint in (("ema", "checkpoint.safetensors"), ("live", "checkpoint-live.safetensors")):
            report_path = work / f"{recipe}-{train_seed}-{weights}.json"
            ramtag("eval", val / "labels.json", "--root", val, "--checkpoint", run / checkpoint,
                   "--labels", val / "all.txt", "--unseen", val / "unseen.txt", "--baseline",
                   "--workers", 0, "--quiet", "--json", report_path)
            report = json.loads(report_path.read_text())
            row[f"{recipe}_{weights}"] = {arm: protocol_maps(report, arm) for arm in ARMS}
        row["branches"][recipe] = branch_maps(
            load_runtime(checkpoint=str(run / "checkpoint.safetensors"), device="cpu"), val
        )
    return row


def summarise(rows: list[dict], recipes) -> dict:
    """Per recipe and weights: mean trained mAP and the mean, minimum and maximum of its gain over each baseline."""
    summary = {}
    for recipe in recipes:
        for weights in ("ema", "live"):
            key = f"{recipe}_{weights}"
            entry = {}
            for protocol in PROTOCOLS:
                values = [row[key]["model"][protocol] for row in rows]
                entry[protocol] = {"trained": statistics.fmean(values)}
                for baseline in ("training_free", "clip_global"):
                    gains = [row[key]["model"][protocol] - row[key][baseline][protocol] for row in rows]
                    entry[protocol][f"vs_{baseline}"] = {"mean": statistics.fmean(gains), "min": min(gains),
                                                         "max": max(gains), "wins": sum(g > 0 for g in gains)}
            summary[key] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="21:12,31:13,41:14,51:15,61:16",
                        help="comma-separated TRAIN:HELDOUT synthetic stream seeds")
    parser.add_argument("--train-n", type=int, default=512)
    parser.add_argument("--val-n", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--recipes", default="adapters,reference")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=OPTIONS",
                        help="an extra recipe: a name and `ramtag train` options, e.g. 'teacher=--teacher-weight 0.2'")
    parser.add_argument("--quick", action="store_true", help="one seed pair, adapters alone")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/train_demo.cpu.json")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.recipes = args.seeds.split(",")[0], "adapters"
    args.recipes = [r for r in args.recipes.split(",") if r]
    for extra in args.recipe:
        name, _, options = extra.partition("=")
        RECIPES[name] = options.split()
        args.recipes.append(name)
    pairs = [tuple(int(s) for s in pair.split(":")) for pair in args.seeds.split(",")]
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "ramtag-bench-quick" / "train_demo.json" if args.quick
        else BENCH_DIR / "results" / "train_demo.cpu.json")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ramtag-train-demo-") as scratch:
        for train_seed, val_seed in pairs:
            rows.append(run_pair(Path(scratch), train_seed, val_seed, args))
            print(json.dumps(rows[-1]), flush=True)
    summary = summarise(rows, args.recipes)
    result = {"summary": summary, "rows": rows, "settings": {**vars(args), "seeds": pairs},
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "cores": os.cpu_count()},
              "seconds": round(time.perf_counter() - started, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nmAP over {len(rows)} seed pairs; gain = trained - baseline, mean [min, max] (wins)")
    for key, entry in summary.items():
        print(key)
        for protocol, figures in entry.items():
            parts = [f"trained {figures['trained']:.3f}"]
            for baseline in ("training_free", "clip_global"):
                gain = figures[f"vs_{baseline}"]
                parts.append(
                    f"vs {baseline} {gain['mean']:+.3f} [{gain['min']:+.3f}, {gain['max']:+.3f}] "
                    f"({gain['wins']}/{len(rows)})"
                )
            print(f"  {protocol:5s} " + "  ".join(parts))
    print(f"written {out}")


if __name__ == "__main__":
    main()
