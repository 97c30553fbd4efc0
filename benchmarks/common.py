"""Shared pieces of the benchmark scripts: devices, interleaved timing, models, synthetic images, results.

Benchmarks are plain scripts (`python benchmarks/NAME.py`), never tests. Each compares its arms in one run,
repeating them in rotating order, so that load from other processes on a shared machine hits every arm
alike and cancels in the ratios; the figures reported are medians over those repeats.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

# The 80 COCO category names: a realistic vocabulary for tagging; larger ones are padded with "object N".
COCO_LABELS = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).replace("_", "\0").split()
COCO_LABELS = tuple(label.replace("\0", " ") for label in COCO_LABELS)

# Shape of ramtag's bundled demo CLIP (scripts/build_demo_model.py defaults), used with random weights when the
# bundled weights are not in this checkout.
DEMO_SHAPE = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
    "quick_gelu": False,
}
VITB = "ViT-B-16-quickgelu"
VITB_ADAPTER_LAYERS = (9, 10, 11)
OPENAI_LOGIT_SCALE = 100.0


# -- devices and threads ------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(count: int | None) -> int:
    """Intra-op threads for this process (default: every core this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count = count or cores
    torch.set_num_threads(count)
    return count


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """Autocast as ramtag's --precision means it (auto: bf16 on CUDA where supported); fp32 off CUDA."""
    from contextlib import nullcontext

    from ramtag.engine.runtime import autocast_dtype

    dtype = autocast_dtype(precision, device) if device.type == "cuda" else None
    return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


# -- timing -------------------------------------------------------------------------------------------------


def interleave(arms: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: torch.device | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Run every arm `warmup` times untimed, then `repeats` rounds in rotating order; seconds per call.

    Rotating the order means no arm always runs first or right after the same neighbour.
    """
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
            if device is not None:
                synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if device is not None:
                synchronize(device)
            start = time.perf_counter()
            arms[name]()
            if device is not None:
                synchronize(device)
            samples[name].append(time.perf_counter() - start)
            if log:
                log(f"  round {round_index + 1}/{repeats} {name}: {samples[name][-1]:.3f} s")
    return samples


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator/denominator from the same round (robust to slow drifts in load)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    box = {"seconds": math.nan}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start


# -- machine and results ------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    import numpy

    info: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": str(device),
        "load_average_at_start": list(os.getloadavg()),
        "environment": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ
        },
    }
    for package in ("open_clip", "ot", "torchvision", "PIL"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # informational only
            pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(name: str, payload: dict[str, Any], device: torch.device, quick: bool = False) -> Path:
    """benchmarks/results/NAME.<cpu|cuda>.json: a GPU run never overwrites the CPU figures, nor the reverse.

    Smoke runs (--quick) go to the temp directory instead, so they never replace real figures.
    RAMTAG_BENCH_RESULTS names another folder (gpu_check.sh points it at the device's $OUT).
    """
    import tempfile

    payload.setdefault("machine", {})["load_average_at_end"] = list(os.getloadavg())
    folder = Path(tempfile.gettempdir()) / "ramtag-bench-quick" if quick else RESULTS_DIR
    folder = Path(os.environ.get("RAMTAG_BENCH_RESULTS") or folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{device.type}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """A plain aligned table on stdout (what the README copies)."""
    if not rows:
        return
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- models -------------------------------------------------------------------------------------------------


def _openai_logit_scale(clip: torch.nn.Module) -> torch.nn.Module:
    # Random open_clip weights start at 1/0.07; OpenAI CLIP's trained value is 100, which is what KCOT's
    # cost sharpness (and so its iteration counts) would see in real use.
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(OPENAI_LOGIT_SCALE))
    return clip.eval()


def vitb_clip(seed: int = 0) -> torch.nn.Module:
    """CLIP ViT-B/16 (QuickGELU, OpenAI's shape) with random weights: nothing is downloaded."""
    import logging

    import open_clip

    torch.manual_seed(seed)
    if os.environ.get("RAMTAG_BENCH_TINY"):
        # Dry runs (gpu_check.sh --dry-run): ViT-B's 12 layers at a tiny width, with OpenAI-shaped 64-wide heads
        # so that a checkpoint holding it rebuilds from its tensors (the --cli arm).
        return _openai_logit_scale(
            open_clip.model.CLIP(
                embed_dim=64,
                vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 12, "head_width": 64},
                text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 12},
                quick_gelu=True,
            )
        )
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded
    return _openai_logit_scale(open_clip.create_model(VITB, pretrained=None, precision="fp32", device="cpu"))


def demo_clip(seed: int = 0) -> tuple[torch.nn.Module, bool]:
    """(CLIP, True) for ramtag's bundled demo model, or (a random CLIP of its shape, False) when it is absent."""
    import open_clip

    from ramtag.errors import CheckpointError
    from ramtag.model.weights import load_demo_clip

    try:
        return load_demo_clip()[0], True
    except CheckpointError:
        torch.manual_seed(seed)
        return _openai_logit_scale(open_clip.model.CLIP(**DEMO_SHAPE)), False


def ram_model(clip: torch.nn.Module, trained: bool, backbone: str = VITB,
              adapter_layers: tuple[int, ...] = VITB_ADAPTER_LAYERS, prompt_layers: tuple[int, ...] | None = None,
              seed: int = 0):
    """RAM around `clip`: with Ladder Local Adapters (trained) or training-free (value-value path + KCOT)."""
    from ramtag.model.config import Preprocessing, RamConfig
    from ramtag.model.ram import RamModel

    torch.manual_seed(seed)
    image_size = int(clip.visual.image_size[0])
    config = RamConfig(
        backbone=backbone,
        pretrained=None,
        trained=trained,
        adapter_layers=adapter_layers if trained else (),
        prompt_layers=(adapter_layers if prompt_layers is None else prompt_layers) if trained else (),
        preprocessing=Preprocessing(image_size=image_size),
    )
    return RamModel(clip, config).eval()


def runtime_for(model, device: torch.device, name: str):
    """A ramtag Runtime around an in-process model (what `load_runtime` returns for a checkpoint)."""
    from ramtag.engine.runtime import Runtime

    return Runtime(
        model=model.to(device).eval(), device=device, fingerprint=f"bench-{name}", source={"model": f"benchmark:{name}"}
    )


def label_names(count: int) -> list[str]:
    names = list(COCO_LABELS[:count])
    names += [f"object {i}" for i in range(len(names), count)]
    return names


def random_label_features(count: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Unnormalised stand-ins for text features: a shared direction plus noise, as CLIP's label features have."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=generator)
    features = 0.6 * common + torch.randn(count, dim, generator=generator)
    return features * (10.0 / features.norm(dim=-1, keepdim=True))


def write_labels(path: Path, count: int) -> Path:
    path.write_text("\n".join(label_names(count)) + "\n", encoding="utf-8")
    return path


# -- images -------------------------------------------------------------------------------------------------


def make_jpegs(
    folder: Path, count: int, size: tuple[int, int] = (640, 480), seed: int = 0, quality: int = 90
) -> list[Path]:
    """Photo-like JPEGs: smooth gradients, shapes and sensor-like noise (so decoding costs what a photo costs)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for index in range(count):
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-0.2, 0.2, (2, 3))
        pixels = base + xs[..., None] * slope[0] + ys[..., None] * slope[1]
        pixels += rng.normal(0, 6, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            x1, y1 = x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        path = folder / f"img_{index:05d}.jpg"
        image.save(path, quality=quality)
        paths.append(path)
    return paths


def decoded_batches(paths: Sequence[Path], transform, batch_size: int) -> list[torch.Tensor]:
    """The images decoded and transformed once, in batches: the model's input with no pipeline cost."""
    from ramtag.data.images import decode_image

    tensors = [transform(decode_image(str(p))) for p in paths]
    return [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]
