"""Settings of a training run: one dataclass, defaults from the reference, loaded from TOML/YAML/JSON files.

Every setting carries its description once, in its field's metadata (`help`, and `section`, the group it is
listed under): `ramtag train --help` is built from them. Precedence: the defaults here < a config file
(`--config`) < options given on the command line. The fully resolved settings are logged at the start of a run
and saved as `train-config.json` beside the checkpoint; that file can be passed back as `--config`.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

from ramtag.engine.train.schedule import SCHEDULES
from ramtag.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BEST_METRIC_DEFAULT = "auto"
BEST_METRIC_PATTERN = re.compile(r"(zsl|gzsl|multilabel)/(mAP|mAP_seen|mAP_unseen|(P|R|F1|CP|CR|CF1|OP|OR|OF1)@(3|5))")

# Fields that may change when a run is resumed: they do not alter what the run computes.
RESUMABLE_CHANGES = frozenset(
    {
        "output", "resume", "device", "map_prefix", "num_workers", "log_every", "checkpoint_every", "val_every",
        "val_every_epochs", "val_batch_size", "val_live", "max_steps", "tensorboard", "progress", "root", "val",
        "best_metric",
    }
)  # fmt: skip

SECTIONS = ("data", "model", "kcot", "images", "optimisation", "run")
"""The groups settings are listed in, in order."""


def _setting(
    section: str, default: Any = MISSING, help: str = "", *, factory: Any = MISSING, option: str = ""
) -> Field:
    """A field with its description; `option` names its command-line option and config-file key where that is
    not the field's own name."""
    metadata = {"help": help, "section": section, "option": option}
    return field(default=default, default_factory=factory, metadata=metadata)


_data, _model, _kcot = partial(_setting, "data"), partial(_setting, "model"), partial(_setting, "kcot")
_images, _optimisation, _run = partial(_setting, "images"), partial(_setting, "optimisation"), partial(_setting, "run")


@dataclass
class TrainConfig:
    # -- data ---------------------------------------------------------------------------------------------
    train: list[str] = _data(
        help="Training data: one annotation file (reference JSON, JSONL manifest, COCO instances) or WebDataset "
        "shards with .json/.txt/.cls labels.",
        factory=list,
    )
    output: str = _data("ramtag-run", "Folder for checkpoints, training state, metrics and logs.")
    root: str | None = _data(None, "Folder that relative image paths are resolved against.")
    map_prefix: list[str] = _data(
        help="Rewrite annotation paths starting with OLD to NEW, before --root (repeatable; the reference's files "
        "name /mnt/nas/... paths).",
        factory=list,
    )
    labels: str | None = _data(
        None,
        "Label space file, one label a line (default: the file's class list, else the labels in the data).",
    )
    unseen: str | None = _data(
        None, "Held-out labels, one a line: never trained on; validation reports ZSL (unseen only) and GZSL."
    )
    val: str | None = _data(
        None,
        "Validation annotation file or shards (same formats as the training data); validated every --val-every "
        "steps or --val-every-epochs epochs.",
    )
    strict_labels: bool = _data(False, "Fail on training labels outside the label space instead of dropping them.")
    samples_per_epoch: int | None = _data(
        None, "Shards: samples per epoch (default: counted by reading the shards' labels once)."
    )
    resume: bool = _data(
        False,
        "Continue the run in --output from its training state (optimizer, schedule, EMA, RNG, data position).",
    )

    # -- model --------------------------------------------------------------------------------------------
    model: str = _model("ViT-B-16-quickgelu", "open_clip architecture of the backbone, or 'demo' for the demo CLIP.")
    pretrained: str | None = _model("openai", "open_clip pretrained tag or a local weights file for --model.")
    init: str | None = _model(
        None, "Start from this ramtag checkpoint (its backbone, adapters and prompts) instead of --model."
    )
    adapter_layers: list[int] | None = _model(
        None, "0-based vision layers with a Ladder Local Adapter (default: the last three; 9,10,11 on ViT-B/16)."
    )
    prompt_layers: list[int] | None = _model(None, "0-based text layers with deep prompts (default: the last three).")
    adapter_tokens: int = _model(8, "Learnable tokens per adapted layer.")
    prompt_tokens: int = _model(4, "Deep prompt tokens per prompted layer.")
    temperature_loc: float | None = _model(
        None, "Initial local temperature (default: 2e-3, the reference's COCO setting; it uses 2e-4 for NUS-WIDE)."
    )
    template: str | None = _model(
        None,
        "Prompt template with {} (default: the --init checkpoint's, the demo model's, else 'A photo of a {}.').",
    )
    teacher_weight: float = _model(
        0.05, "Weight of the frozen teacher's knowledge term in the KCOT cost; 0 turns the teacher off."
    )
    ot_reg: float = _kcot(
        0.1,
        "Sinkhorn entropic regularisation at inference; training adds --teacher-weight (0.15, as the reference).",
    )
    ot_max_iter: int = _kcot(100, "Sinkhorn iteration limit.")
    ot_tol: float = _kcot(1e-3, "Sinkhorn tolerance.")
    ot_stop: str = _kcot("reference", "Sinkhorn stopping rule: reference (parity) or marginal.")

    # -- images -------------------------------------------------------------------------------------------
    image_size: int | None = _images(
        None, "Training and evaluation size; must equal the backbone's input size (default: the backbone's)."
    )
    padding: int = _images(10, "Pixels of padding before the random crop back to size.")
    flip: float = _images(0.5, "Horizontal flip probability.")
    erase: float = _images(0.5, "Random erasing probability (after normalisation, per-pixel noise).")
    photometric: bool = _images(
        True, "The reference's crop, blur, contrast, affine, noise and brightness augmentation."
    )

    # -- optimisation -------------------------------------------------------------------------------------
    batch_size: int = _optimisation(32, "Global batch per optimizer micro-step, split evenly over processes.")
    epochs: int = _optimisation(6, "Epochs the learning-rate schedule spans (the run's length without --max-steps).")
    max_steps: int | None = _optimisation(
        None, "Stop after this many optimizer steps (the schedule still spans --epochs)."
    )
    grad_accum: int = _optimisation(1, "Micro-batches per optimizer step (the MMC softmax spans one micro-batch).")
    lr: float = _optimisation(5e-5, "AdamW rate of the two temperatures (the reference's BASE_LR).")
    adapter_lr: float = _optimisation(5e-6, "AdamW rate of the adapter weights (the reference's 0.1 x BASE_LR).")
    token_lr: float = _optimisation(1e-3, "SGD rate of the adapter tokens and deep prompts.")
    momentum: float = _optimisation(0.9, "SGD momentum.")
    weight_decay: float = _optimisation(1e-4, "AdamW weight decay of the temperatures and adapters.")
    token_weight_decay: float = _optimisation(1e-4, "SGD weight decay of the adapter tokens and deep prompts.")
    schedule: str = _optimisation(
        "reference",
        "reference (60-epoch cosine stepped per epoch, 3 warm-up epochs), cosine (per step over the run) or constant.",
    )
    warmup_epochs: float | None = _optimisation(
        None, "Warm-up length in epochs (default: 3 for reference, 5% of the run for cosine, none for constant)."
    )
    clip_grad_norm: float = _optimisation(
        0.0, "Clip the global gradient norm of the trainable tensors to this; 0 = off, as the reference."
    )
    precision: str = _optimisation(
        "auto", "fp32, or AMP with bf16 or fp16 (needs CUDA); auto is bf16 on CUDA where supported, else fp32."
    )
    ema_decay: float = _optimisation(
        0.9997, "EMA of the trainable weights, used for validation and the exported checkpoint; 0 = off."
    )
    seed: int = _optimisation(
        42, "Seed of the initial weights, the epochs' image order and every image's augmentation."
    )

    # -- loop ---------------------------------------------------------------------------------------------
    device: str = _run("auto", "auto, cpu, cuda or cuda:N.")
    num_workers: int = _run(2, "DataLoader worker processes per process.", option="workers")
    log_every: int = _run(10, "Optimizer steps between metric lines (metrics.jsonl and the log).")
    checkpoint_every: int = _run(500, "Optimizer steps between checkpoints; 0 = only at the end, which always saves.")
    val_every: int = _run(0, "Optimizer steps between validations; 0 = by epochs only.")
    val_every_epochs: int = _run(1, "Epochs between validations (with --val).")
    val_batch_size: int = _run(64, "Images per forward pass during validation.")
    val_live: bool = _run(
        True, "With EMA on, also validate the live weights, as the reference does (the EMA weights always are)."
    )
    best_metric: str = _run(
        BEST_METRIC_DEFAULT,
        "Validation metric that picks best.safetensors, e.g. gzsl/mAP, zsl/F1@3; auto: gzsl/mAP with --unseen, "
        "else multilabel/mAP.",
    )
    tensorboard: bool = _run(False, "Also write TensorBoard event files (needs the tensorboard package).")
    progress: bool | None = _run(None, "Progress bar on stderr (default: when stderr is a terminal).")

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        self.train = [str(item) for item in self.train]
        self.map_prefix = [
            str(item) for item in ([self.map_prefix] if isinstance(self.map_prefix, str) else self.map_prefix)
        ]
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
        for name in (
            "lr",
            "adapter_lr",
            "token_lr",
            "weight_decay",
            "token_weight_decay",
            "teacher_weight",
            "clip_grad_norm",
        ):
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
        for option, setting in option_names().items():  # keys may be written as the options are named
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


def option_name(setting: Field) -> str:
    """The name of a setting's command-line option and config-file key, without the leading dashes."""
    return setting.metadata.get("option") or setting.name.replace("_", "-")


def option_names() -> dict[str, str]:
    """Options of `ramtag train` whose setting has another name, as `{option key: setting}`."""
    names = {option_name(f).replace("-", "_"): f.name for f in fields(TrainConfig)}
    return {key: name for key, name in names.items() if key != name}


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


def resolve_config(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
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
        for f in fields(config)
        if not _fits(getattr(config, f.name), hints[f.name])
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
