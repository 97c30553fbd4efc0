"""Zero-shot quality of the bundled demo model on the synthetic benchmark, and how the scorers degrade as
distractor labels join the vocabulary, and where region maps peak (issue 4's measurements; the README quotes them).

    python benchmarks/demo_vocabulary.py --n 400 --seed 7
    python benchmarks/demo_vocabulary.py --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ramtag.engine.runtime import load_runtime

from demo_study import distractor_study, local_rule, map_peak_hits, synthetic_images, zero_shot_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="benchmark images")
    parser.add_argument("--seed", type=int, default=7, help="synthetic stream (the demo CLIP never saw it)")
    parser.add_argument("--distractors", type=int, nargs="+", default=[0, 10, 100, 1000])
    parser.add_argument("--quick", action="store_true", help="100 images, distractors 0 and 100")
    parser.add_argument("--out", default="benchmarks/results/demo_vocabulary.json")
    args = parser.parse_args()
    if args.quick:
        args.n, args.distractors = 100, [0, 100]
    torch.manual_seed(0)
    runtime = load_runtime(model="demo", device="auto")
    started = time.perf_counter()
    data = synthetic_images(runtime, args.n, args.seed)
    with local_rule(runtime, "fixed"):
        zero_shot_fixed = zero_shot_report(runtime, data)
    result = {
        "local_temperature": runtime.model.config.local_temperature,
        "zero_shot": zero_shot_report(runtime, data),
        "zero_shot_fixed_local_temperature": zero_shot_fixed,
        "distractors": distractor_study(runtime, data, args.distractors),
        "map_peaks": map_peak_hits(runtime, data),
        "settings": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(runtime.device)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    zs, fixed = result["zero_shot"], result["zero_shot_fixed_local_temperature"]
    print(f"zero-shot mAP on {zs['images']} images ({zs['labels']} labels): all / unseen / shapes / colours")
    rule = result["local_temperature"]
    for name, report, arm in [("clip_global", zs, "clip_global"), (f"ram_local ({rule})", zs, "ram_local"),
                              (f"ram ({rule})", zs, "ram"), ("ram_local (fixed)", fixed, "ram_local"),
                              ("ram (fixed)", fixed, "ram"), ("chance", zs, "chance")]:
        print(f"  {name:20s} " + " / ".join(f"{report[arm][g]:.3f}" for g in ("all", "unseen", "shapes", "colours")))
    for kind, row in result["map_peaks"].items():
        print(
            f"map peaks inside the {kind}'s box: {row['hit_rate']:.2f} (chance {row['chance']:.2f}, "
            f"{row['trials']} labels)"
        )
    print("distractors  local temperature  clip_global  ram_local  ram")
    for row in result["distractors"]:
        print(
            f"  {row['distractors']:9d}  {row['local_temperature']:15s}  {row['clip_global']:.3f}        "
            f"{row['ram_local']:.3f}      {row['ram']:.3f}"
        )


if __name__ == "__main__":
    main()
