"""Settings of a training run: one dataclass, defaults from the reference, loaded from TOML/YAML/JSON files.

Precedence: the defaults here < a config file (`--config`) < options given on the command line. The fully
resolved settings are logged at the start of a run and saved as `train-config.json` beside the checkpoint;
that file can be passed back as `--config`.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ramtag.engine.schedule import SCHEDULES
from ramtag.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BEST_METRIC_DEFAULT = "auto"
BEST_METRIC_PATTERN = re.compile(r"(zsl|gzsl|multilabel)/(mAP|mAP_seen|mAP_unseen|(P|R|F1|CP|CR|CF1|OP|OR|OF1)@(3|5))")

# Fields that may change when a run is resumed: they do not alter what the run computes.
RESUMABLE_CHANGES = frozenset(
    {
        "output", "resume", "device", "map_prefix", "num_workers", "log_every", "checkpoint_every", "val_every",
        "val_every_epochs", "val_batch_size", "val_live", "max_steps", "tensorboard", "progress", "root", "val", "best_metric",
    }
)


OPTION_NAMES = {"workers": "num_workers"}
"""Options of `ramtag train` whose setting has another name."""


@dataclass
class TrainConfig:
    # -- data ---------------------------------------------------------------------------------------------
    train: list[str] = field(default_factory=list)
    """Training data: annotation files (reference JSON, JSONL manifest, COCO instances) or WebDataset shards."""
    output: str = "ramtag-run"
    """Folder for checkpoints, the training state, metrics and logs."""
    root: str | None = None
    """Folder that relative image paths in annotation files are resolved against."""
    map_prefix: list[str] = field(default_factory=list)
    """`OLD=NEW` rewrites of annotation paths before `root` (the reference's files name /mnt/nas/... paths)."""
    labels: str | None = None
    """Seen-label file (one label a line); default: the labels of the training data."""
    val: str | None = None
    """Validation data (same formats as `train`); validates every `val_every` steps / `val_every_epochs` epochs."""
    unseen: str | None = None
    """Held-out label file: validation reports ZSL (unseen labels only) and GZSL (seen + unseen)."""
    strict_labels: bool = False
    """Fail on training labels outside the label space instead of dropping them."""
    resume: bool = False
    """Continue the run in `output` from its training state (optimizer, schedule, EMA, RNG, data position)."""

    # -- model --------------------------------------------------------------------------------------------
    model: str = "ViT-B-16-quickgelu"
    """open_clip architecture of the backbone, or `demo` for the bundled demo CLIP."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag or a local weights file for `model`."""
    init: str | None = None
    """Start from this ramtag checkpoint (its backbone, adapters and prompts) instead of `model`."""
    adapter_layers: list[int] | None = None
    """0-based vision layers with a Ladder Local Adapter; default: the last three (9, 10, 11 on ViT-B/16)."""
    prompt_layers: list[int] | None = None
    """0-based text layers with deep prompts; default: the last three."""
    adapter_tokens: int = 8
    prompt_tokens: int = 4
    temperature_loc: float | None = None
    """Initial local temperature; default 2e-3 (the reference's COCO setting; it uses 2e-4 for NUS-WIDE)."""
    template: str | None = None
    """Prompt template; default: the `--init` checkpoint's, the demo model's, else "A photo of a {}."."""
    teacher_weight: float = 0.05
    """Weight of the frozen teacher's knowledge term in the KCOT cost (0 turns the teacher off)."""
    ot_reg: float = 0.1
    """Sinkhorn regularisation at inference; training adds `teacher_weight` to it (the reference's 0.15)."""
    ot_max_iter: int = 100
    ot_tol: float = 1e-3
    ot_stop: str = "reference"
    """Sinkhorn stopping rule: `reference` (parity) or `marginal`."""

    # -- images -------------------------------------------------------------------------------------------
    image_size: int | None = None
    """Training and evaluation size; default: the backbone's input size (224 for ViT-B/16)."""
    padding: int = 10
    flip: float = 0.5
    erase: float = 0.5
    """Probability of random erasing (after normalisation, per-pixel noise)."""
    photometric: bool = True
    """The reference's crop, blur, contrast, affine, noise and brightness augmentation."""

    # -- optimisation -------------------------------------------------------------------------------------
    batch_size: int = 32
    """Global batch per optimizer micro-step, split evenly over ranks."""
    epochs: int = 6
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule still spans `epochs`)."""
    samples_per_epoch: int | None = None
    """WebDataset shards only: samples in an epoch (default: counted by reading the shards' labels once)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the MMC softmax spans one micro-batch)."""
    lr: float = 5e-5
    """AdamW rate of the two temperatures (reference BASE_LR)."""
    adapter_lr: float = 5e-6
    """AdamW rate of the adapter weights (reference: 0.1 x BASE_LR)."""
    token_lr: float = 1e-3
    """SGD rate of the adapter tokens and deep prompts."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    token_weight_decay: float = 1e-4
    schedule: str = "reference"
    """`reference` (60-epoch cosine stepped per epoch, 3 warm-up epochs), `cosine` (per step over the run) or `constant`."""
    warmup_epochs: float | None = None
    """Warm-up length; default 3 for `reference`, 5% of the run for `cosine`, none for `constant`."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm of the trainable tensors to this (0: no clipping, as the reference)."""
    precision: str = "auto"
    """fp32, or AMP with bf16/fp16 on CUDA; `auto` is bf16 on CUDA where supported, else fp32."""
    ema_decay: float = 0.9997
    """EMA of the trainable weights, used for validation and the exported checkpoint (0: off)."""
    seed: int = 42

    # -- loop ---------------------------------------------------------------------------------------------
    device: str = "auto"
    num_workers: int = 2
    log_every: int = 10
    """Optimizer steps between metric lines (metrics.jsonl and the log)."""
    checkpoint_every: int = 500
    """Optimizer steps between checkpoints (0: only at the end); the end of the run always saves."""
    val_every: int = 0
    """Optimizer steps between validations (0: by epochs only)."""
    val_every_epochs: int = 1
    val_batch_size: int = 64
    val_live: bool = True
    """With EMA on, also validate the live weights (as the reference does); the EMA weights are always validated."""
    best_metric: str = BEST_METRIC_DEFAULT
    """Validation metric that picks `best.safetensors`; `auto`: GZSL mAP with unseen labels, else mAP."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""
    progress: bool | None = None
    """Rich progress bar on stderr; default: when stderr is a terminal."""

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        self.train = [str(item) for item in self.train]
        self.map_prefix = [str(item) for item in ([self.map_prefix] if isinstance(self.map_prefix, str) else self.map_prefix)]
        for name in ("adapter_layers", "prompt_layers"):  # the CLI's I,J,K form, in a config file too
            value = getattr(self, name)
            if isinstance(value, str) and re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", value):
                setattr(self, name, [int(part) for part in value.split(",")])
        problems = _type_problems(self)
        if problems:  # a config file can hold anything; the checks below assume the declared types
            raise UsageError("invalid training settings: " + "; ".join(problems))
        for name in ("adapter_layers", "prompt_layers"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, sorted(int(i) for i in value))
        positive_ints = ("batch_size", "epochs", "grad_accum", "log_every", "val_batch_size", "val_every_epochs")
        problems += [f"{name} must be at least 1" for name in positive_ints if getattr(self, name) < 1]
        non_negative = ("checkpoint_every", "val_every", "num_workers", "padding", "adapter_tokens", "prompt_tokens")
        problems += [f"{name} cannot be negative" for name in non_negative if getattr(self, name) < 0]
        for name in ("lr", "adapter_lr", "token_lr", "weight_decay", "token_weight_decay", "teacher_weight", "clip_grad_norm"):
            if getattr(self, name) < 0:
                problems.append(f"{name} cannot be negative")
        if self.temperature_loc is not None and self.temperature_loc <= 0:
            problems.append("temperature_loc must be positive")
        for name in ("flip", "erase"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} is a probability (0 to 1)")
        if not 0.0 <= self.momentum < 1.0:
            problems.append("momentum must be in [0, 1)")
        if not (self.ema_decay == 0 or 0.0 < self.ema_decay < 1.0):
            problems.append("ema_decay must be 0 (off) or in (0, 1)")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            problems.append("warmup_epochs cannot be negative")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be at least 1")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            problems.append("samples_per_epoch must be at least 1")
        if self.best_metric != BEST_METRIC_DEFAULT and not BEST_METRIC_PATTERN.fullmatch(self.best_metric):
            problems.append(
                f"best_metric {self.best_metric!r} is not PROTOCOL/METRIC (protocol zsl, gzsl or multilabel; metric "
                "mAP, mAP_seen, mAP_unseen, or P, R, F1, CP, CR, CF1, OP, OR, OF1 @3 or @5), e.g. gzsl/mAP"
            )
        if self.image_size is not None and self.image_size < 8:
            problems.append("image_size must be at least 8")
        if self.template is not None and "{}" not in self.template:
            problems.append(f"template {self.template!r} has no {{}} for the label")
        if problems:
            raise UsageError("invalid training settings: " + "; ".join(problems))

    def require_data(self) -> None:
        if not self.train:
            raise UsageError("no training data: pass annotation files or shards (or `train = [...]` in --config)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        normalised = {key.replace("-", "_"): value for key, value in data.items()}
        for option, setting in OPTION_NAMES.items():  # keys may be written as the options are named
            if option in normalised and setting not in normalised:
                normalised[setting] = normalised.pop(option)
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise UsageError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**normalised)

    def changed_from(self, other: "TrainConfig") -> list[str]:
        """Names of settings that differ and would change what a resumed run computes."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k])


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML, YAML or JSON file (a flat table; a `[train]` table is also accepted)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{path}: cannot read config file ({error.strerror or error})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError(f"{path}: YAML config files need PyYAML (pip install pyyaml), or use TOML") from None
            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise UsageError(f"{path}: config files must end in .toml, .yaml, .yml or .json")
    except UsageError:
        raise
    except Exception as error:  # tomllib, yaml and json each raise their own parse errors
        raise UsageError(f"{path}: cannot parse config file: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a config file holds a table of settings")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return data


def resolve_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then `base` (a saved run's settings), then the config file, then explicit options (not None)."""
    merged: dict[str, Any] = dict(base or {})
    if config_file is not None:
        merged.update({k.replace("-", "_"): v for k, v in read_config_file(config_file).items()})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig.from_dict(merged)


def _type_problems(config: "TrainConfig") -> list[str]:
    """Settings whose values do not have their declared types (ints for int, finite numbers for float, true or
    false for bool, lists of them), as readable problems. Options are typed by the CLI; config files are not."""
    hints = typing.get_type_hints(type(config))
    return [
        f"{f.name} must be {_describe(hints[f.name])}, not {getattr(config, f.name)!r}"
        for f in fields(config) if not _fits(getattr(config, f.name), hints[f.name])
    ]


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        return isinstance(value, (list, tuple)) and all(_fits(element, item) for element in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin in (list, tuple):
        plurals = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        item = typing.get_args(hint)[0]
        return f"a list of {plurals.get(item, str(item))}"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "unset"}
    return names.get(hint, str(hint))

