"""The training-state file: everything beyond the model needed to continue a run exactly where it stopped.

Written with torch.save from plain tensors, numbers, strings, lists and dicts only, so it loads with
`torch.load(weights_only=True)`: no pickled objects. Written atomically (temporary file, then rename).
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ramtag.atomic import atomic_path
from ramtag.engine.train.config import TrainConfig
from ramtag.engine.train.ema import TrainableEma
from ramtag.errors import CheckpointError, UsageError
from ramtag.fingerprint import fingerprint
from ramtag.model.checkpoint import save_checkpoint
from ramtag.model.ram import RamModel

STATE_VERSION = 1

# The files of a run folder (besides train.log and metrics.jsonl, see ramtag.engine.train.log).
CHECKPOINT = "checkpoint.safetensors"
LIVE_CHECKPOINT = "checkpoint-live.safetensors"
BEST_CHECKPOINT = "best.safetensors"
STATE_FILE = "training-state.pt"
CONFIG_FILE = "train-config.json"
SUMMARY_FILE = "train-summary.json"
BAD_IMAGES_FILE = "bad-images.txt"
DROPPED_LABELS_FILE = "dropped-labels.txt"


def annotations_fingerprint(items) -> str:  # LabelledItems
    """What the training images and their labels are, in order: a resumed run's data position indexes them."""
    return fingerprint([[item.key, list(item.labels)] for item in items])


def previous_state(config: TrainConfig, output: Path) -> dict[str, Any] | None:
    """The training state `--resume` continues from, checked against `config`; None for a fresh run (refused
    where a run already is)."""
    state_path = output / STATE_FILE
    if config.resume:
        state = load_training_state(state_path)
        changed = config.changed_from(TrainConfig.from_dict(state["config"]))
        if changed:
            raise UsageError(
                f"--resume: these settings differ from the run in {output}: {', '.join(changed)} "
                f"(resume with the original settings, e.g. --config {output / CONFIG_FILE})"
            )
        return state
    if state_path.exists():
        raise UsageError(
            f"{output} already holds a training run: pass --resume to continue it, or choose another --output"
        )
    return None


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def save_training_state(path: str | Path, state: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_path(path) as temporary:
        torch.save({"version": STATE_VERSION, **_to_cpu(state)}, temporary)
    return path


def save_model(path: Path, model: RamModel, ema: TrainableEma | None, include_backbone: bool, extra: dict) -> None:
    """A ramtag checkpoint of `model`, with the EMA's weights when `ema` is given (recorded in `weights`)."""
    extra = {"weights": "ema" if ema is not None else "live", **extra}
    with ema.applied_to(model) if ema is not None else nullcontext():
        save_checkpoint(path, model, include_backbone=include_backbone, extra=extra)


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files and pickled objects are refused alike
        raise CheckpointError(f"{path}: cannot read the training state ({error.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: not a ramtag training state (version {STATE_VERSION})")
    return state
