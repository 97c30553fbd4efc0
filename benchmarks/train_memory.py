"""Training memory and speed: adapter training vs fine-tuning the last three backbone blocks vs the whole backbone.

Same ViT-B/16-sized backbone (random weights), same batch, same labels and the same RAM loss (MMC on global
and local logits, KCOT with the teacher term) in every arm; only what trains differs:

- `adapters`: RAM as ramtag trains it: Ladder Local Adapters at 9-11, adapter tokens, deep text prompts at
  9-11, temperatures. The prompted text encoder runs every step (the prompts train).
- `adapters_no_prompts`: the same without deep text prompts, so label features are computed once and the
  text encoder builds no graph: what the vision side of adapter training costs on its own.
- `last3`: no adapters, tokens or prompts; vision blocks 9-11 (and the temperatures) train.
- `whole`: the whole vision tower (and the temperatures) trains.

Each arm runs in its own fresh process (so one arm's allocations never count against another), arms
interleaved over rounds. No graph exists before an arm's first trainable block: the frozen layers run
without autograd. Memory is the peak over the steps minus what was resident just before the first step:
on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after returning freed heap to the system), which counts activations, gradients and
optimiser state alike.

    python benchmarks/train_memory.py           # a few minutes on 2 idle cores
    python benchmarks/train_memory.py --quick
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import common
from common import log

ARMS = ("adapters", "adapters_no_prompts", "last3", "whole")
TARGET_ADAPTER_OVER_WHOLE = 0.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 32 (the reference's) on GPU")
    parser.add_argument("--labels", type=int, default=48, help="training vocabulary (COCO's seen split has 48)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per arm")
    parser.add_argument("--no-teacher", action="store_true", help="drop KCOT's teacher term (one frozen forward less)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    return parser.parse_args()


# -- one arm, in its own process ------------------------------------------------------------------------------


def _proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak bytes above the resident baseline at `start()`: CUDA allocator stats, else VmHWM on Linux."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: it would hide new growth
        except OSError:
            pass
        self.baseline = _proc_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one

    def peak(self) -> tuple[int, int]:
        """(peak above baseline, absolute peak) in bytes."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
        else:
            top = _proc_kib("VmHWM") * 1024
        return top - self.baseline, top


def build_arm(arm: str, labels: int):
    """(model, trainable parameters, optimisers, tokens for the per-step prompted text pass or None)."""
    import open_clip

    from ramtag.model.config import RamConfig
    from ramtag.model.ram import RamModel

    clip = common.vitb_clip()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(clip.positional_embedding.shape[0]))
    names = common.label_names(labels)
    if arm in ("adapters", "adapters_no_prompts"):
        model = common.ram_model(clip, trained=True)
        if arm == "adapters_no_prompts":
            model.text.prompts = torch.nn.ParameterDict()  # no deep prompts: label features stay fixed
        token_params = [
            p
            for n, p in model.trainable_parameters().items()
            if n.startswith(("vision.adapter_tokens.", "text.prompts."))
        ]
        other = [
            p
            for n, p in model.trainable_parameters().items()
            if not n.startswith(("vision.adapter_tokens.", "text.prompts."))
        ]
        optimisers = [
            torch.optim.AdamW(other, lr=5e-6, weight_decay=1e-4),
            torch.optim.SGD(token_params, lr=1e-3, momentum=0.9),
        ]
        tokens = tokenizer([model.config.template.format(n) for n in names])
        return model, other + token_params, optimisers, tokens
    first = {"last3": 9, "whole": 0}[arm]
    model = RamModel(
        clip, RamConfig(backbone=common.VITB, pretrained=None, trained=True, adapter_layers=(), prompt_layers=())
    )
    # The dual-path forward builds its graph from its first adapter layer on; pointing that layer at the first
    # fine-tuned block (with no adapter there) makes the frozen blocks before it run without autograd.
    model.vision.adapter_layers = (first,)
    blocks = clip.visual.transformer.resblocks
    backbone = list(clip.visual.parameters()) if arm == "whole" else [p for b in blocks[first:] for p in b.parameters()]
    for parameter in backbone:
        parameter.requires_grad_(True)
    trainable = backbone + [model.temperature, model.temperature_loc]
    tokens = tokenizer([model.config.template.format(n) for n in names])
    return model, trainable, [torch.optim.AdamW(trainable, lr=1e-5, weight_decay=1e-4)], tokens


def run_child(args) -> dict:
    from ramtag.model.ram import ram_loss

    device = common.pick_device(args.device)
    threads = common.set_threads(args.threads)
    torch.manual_seed(0)
    model, trainable, optimisers, tokens = build_arm(args.child, args.labels)
    model = model.to(device).train()
    tokens = tokens.to(device)
    generator = torch.Generator().manual_seed(1)
    size = int(model.clip.visual.image_size[0])
    images = torch.randn(args.batch_size, 3, size, size, generator=generator).to(device)
    targets = (torch.rand(args.batch_size, args.labels, generator=generator) < 0.05).float()
    targets[torch.arange(args.batch_size), torch.randint(0, args.labels, (args.batch_size,), generator=generator)] = 1
    targets = targets.to(device)
    with torch.no_grad():
        teacher = model.encode_labels(tokens, use_prompts=False).float()
        # Without deep prompts nothing in the text encoder trains: its features are computed once.
        fixed_features = None if len(model.text.prompts) else model.encode_labels(tokens).float()

    def step() -> float:
        start = time.perf_counter()
        for optimiser in optimisers:
            optimiser.zero_grad(set_to_none=True)
        features = model.encode_labels(tokens) if fixed_features is None else fixed_features
        output = model(images, features, targets=None if args.no_teacher else targets,
                       teacher_label_features=None if args.no_teacher else teacher)
        ram_loss(output, targets).backward()
        for optimiser in optimisers:
            optimiser.step()
        common.synchronize(device)
        return time.perf_counter() - start

    memory = PeakMemory(device)
    memory.start()
    warm = step()
    times = [step() for _ in range(args.steps)]
    peak, absolute = memory.peak()
    return {
        "arm": args.child,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "peak_bytes_above_baseline": peak,
        "peak_bytes_absolute": absolute,
        "baseline_bytes": memory.baseline,
        "warmup_step_seconds": warm,
        "step_seconds": times,
        "threads": threads,
    }


# -- the parent: fresh processes, interleaved ---------------------------------------------------------------


def run_arm(arm: str, args) -> dict:
    command = [sys.executable, __file__, "--child", arm, "--device", args.device, "--batch-size", str(args.batch_size),
               "--labels", str(args.labels), "--steps", str(args.steps)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.no_teacher:
        command.append("--no-teacher")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"arm {arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return
    device = common.pick_device(args.device)
    threads = common.set_threads(args.threads)
    if args.quick:
        args.batch_size, args.steps, args.rounds = args.batch_size or 2, 1, 1
    args.batch_size = args.batch_size or (32 if device.type == "cuda" else 8)
    machine = common.machine_info(device)
    arms = [a.strip() for a in args.arms.split(",")]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for round_index in range(args.rounds):
        shift = round_index % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            result = run_arm(arm, args)
            runs[arm].append(result)
            log(
                f"  round {round_index + 1}/{args.rounds} {arm}: peak "
                f"+{result['peak_bytes_above_baseline'] / 2**20:.0f} MiB, "
                f"step {common.summary(result['step_seconds'])['median']:.2f} s"
            )
    rows = []
    for arm, results in runs.items():
        peaks = [r["peak_bytes_above_baseline"] for r in results]
        steps = [s for r in results for s in r["step_seconds"]]
        rows.append({
            "arm": arm,
            "trainable_parameters": results[0]["trainable_parameters"],
            "peak_mib_above_baseline": common.summary(peaks)["median"] / 2**20,
            "peak_mib_absolute": common.summary([r["peak_bytes_absolute"] for r in results])["median"] / 2**20,
            "step_seconds": common.summary(steps)["median"],
            "images_per_second": args.batch_size / common.summary(steps)["median"],
        })
    by_arm = {r["arm"]: r for r in rows}
    ratios = {}
    if "adapters" in by_arm:
        for other in ("whole", "last3"):
            if other in by_arm:
                ratios[f"adapters_over_{other}_peak"] = (
                    by_arm["adapters"]["peak_mib_above_baseline"] / by_arm[other]["peak_mib_above_baseline"]
                )
                ratios[f"adapters_over_{other}_step_time"] = (
                    by_arm["adapters"]["step_seconds"] / by_arm[other]["step_seconds"]
                )
    if "adapters_over_whole_peak" in ratios:
        ratios[f"target_adapters_over_whole_peak_at_most_{TARGET_ADAPTER_OVER_WHOLE}"] = (
            ratios["adapters_over_whole_peak"] <= TARGET_ADAPTER_OVER_WHOLE
        )
    payload = {"benchmark": "train_memory", "machine": machine, "threads": threads, "settings": vars(args),
               "results": rows, "ratios": ratios, "runs": runs}
    path = common.write_results("train_memory", payload, device, quick=args.quick)
    common.print_table(
        f"Training step, batch {args.batch_size}, {args.labels} labels ({device}, {threads} threads; medians over "
        f"{args.rounds} fresh processes per arm)",
        rows,
    )
    print("\n" + "\n".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in ratios.items()))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
