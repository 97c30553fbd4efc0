"""What an evaluation is: its settings, protocols and arms, and the results every scorer fills.

Both ways of scoring (a model, :mod:`ramtag.engine.eval.model`; a score table,
:mod:`ramtag.engine.eval.table`) fill these types, calibration (:mod:`ramtag.engine.eval.calibrate`) adds its
:class:`Calibration` to the :class:`EvalResult`, and :mod:`ramtag.engine.eval.render` renders it. The types
import no other module of the package, so every one of them can import the types.

Protocols, as the reference defines them (its COCO ``test_17`` file is exactly the images of
``test_65`` that carry one of the 17 unseen labels, with only those labels kept):

* ``zsl``: the model scores the unseen labels only; images with at least one unseen label.
* ``gzsl``: the model scores seen plus unseen labels; every image.
* ``multilabel`` (no unseen list): the model scores the whole label space; every image.

Images without any label in a protocol's label set stay as negatives for every label, as the
reference's loader keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ramtag.calibration import LabelThresholds
from ramtag.data.labelled import LabelSpace
from ramtag.data.labelled_samples import LabelTally
from ramtag.errors import UsageError
from ramtag.metrics import MetricsReport

Log = Callable[[str], None]

ZSL, GZSL, MULTILABEL = "zsl", "gzsl", "multilabel"
MODEL_ARM, TRAINING_FREE_ARM, CLIP_GLOBAL_ARM = "model", "training_free", "clip_global"
ARM_TITLES = {MODEL_ARM: "RAM", TRAINING_FREE_ARM: "training-free RAM", CLIP_GLOBAL_ARM: "CLIP global"}
PROTOCOL_TITLES = {ZSL: "ZSL", GZSL: "GZSL", MULTILABEL: "multi-label"}
MAX_EXAMPLES = 20
"""How many labels or keys a warning lists before saying how many more there are."""


def ignore_log(_: str) -> None:
    """The default ``log``: warnings are still collected in :attr:`EvalResult.warnings`."""


@dataclass
class EvalSettings:
    """What to evaluate and how; the CLI fills it from its options."""

    root: str | None = None
    """Resolves relative image paths of the annotation file."""
    prefix_map: tuple[str, ...] = ()
    """``OLD=NEW`` rewrites applied to annotation paths before ``root``."""
    labels: tuple[str, ...] | None = None
    """The whole label space (seen plus unseen), in vocabulary order; default: from the data. For a score table
    whose metadata records no vocabulary, also the order of its ``scores`` column."""
    unseen: tuple[str, ...] | None = None
    """Held-out labels; when given, ZSL and GZSL are evaluated."""
    strict_labels: bool = False
    """Labels outside the label space are an error instead of being dropped."""
    ks: tuple[int, ...] = (3, 5)
    batch_size: int = 32
    workers: int | None = None
    """DataLoader decoding processes; None: cores - 1, at most 8 (as ``ramtag tag``)."""
    baseline: bool = False
    calibrate: bool = False
    target_precision: float | None = None
    """Calibrate to the lowest threshold reaching this precision; None: best F1 per label."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers cannot be negative, got {self.workers}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise UsageError(f"top-k values must be at least 1, got {list(self.ks)}")
        if self.target_precision is not None and not 0.0 < self.target_precision <= 1.0:
            raise UsageError(f"--target-precision must be in (0, 1], got {self.target_precision}")
        for mapping in self.prefix_map:
            if "=" not in mapping or mapping.startswith("="):
                raise UsageError(f"--map-prefix must look like OLD=NEW, got {mapping!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "prefix_map": list(self.prefix_map),
            "labels_given": self.labels is not None,
            "unseen_given": self.unseen is not None,
            "strict_labels": self.strict_labels,
            "ks": list(self.ks),
            "batch_size": self.batch_size,
            "workers": self.workers,
            "baseline": self.baseline,
            "calibrate": self.calibrate,
            "target_precision": self.target_precision,
        }


@dataclass(frozen=True)
class Protocol:
    name: str
    labels: tuple[str, ...]
    require_any: tuple[str, ...] | None = None
    """Only images with at least one of these labels (ZSL: the unseen labels)."""

    @property
    def title(self) -> str:
        return PROTOCOL_TITLES.get(self.name, self.name)


@dataclass
class ArmResult:
    name: str
    metrics: MetricsReport
    scores: np.ndarray = field(repr=False)
    """``[images, labels]`` scores in data order."""
    extra: dict[str, float | None] = field(default_factory=dict)
    label: str | None = None
    """Display name; default from :data:`ARM_TITLES`."""

    @property
    def title(self) -> str:
        return self.label or ARM_TITLES.get(self.name, self.name)


@dataclass
class ProtocolResult:
    protocol: Protocol
    keys: list[str]
    targets: np.ndarray = field(repr=False)
    arms: dict[str, ArmResult]
    tally: LabelTally

    @property
    def name(self) -> str:
        return self.protocol.name

    @property
    def labels(self) -> tuple[str, ...]:
        return self.protocol.labels


@dataclass
class Calibration:
    """Per-label thresholds fitted on one protocol's scores of one arm, with their fingerprints."""

    protocol: str
    arm: str
    labels: tuple[str, ...]
    thresholds: LabelThresholds
    vocabulary_fingerprint: str | None
    model_fingerprint: str | None
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "arm": self.arm,
            "n_images": self.n_images,
            "vocabulary_fingerprint": self.vocabulary_fingerprint,
            "model_fingerprint": self.model_fingerprint,
            **self.thresholds.to_dict(self.labels),
        }


@dataclass
class EvalResult:
    """Everything rank 0 knows after an evaluation; :mod:`ramtag.engine.eval.render` renders it."""

    protocols: dict[str, ProtocolResult]
    label_space: LabelSpace
    data: str
    model: dict[str, Any]
    settings: EvalSettings
    world_size: int = 1
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: Calibration | None = None
    score_table: dict[str, Any] | None = None

    def images_not_evaluated(self) -> int:
        """Annotated images that no protocol could score: failed to load, or absent from a score table."""
        failed = {key for result in self.protocols.values() for key, _ in result.tally.failed}
        absent = (self.score_table or {}).get("annotations_not_in_table", 0)
        return len(failed) + int(absent)


__all__ = [
    "ARM_TITLES",
    "CLIP_GLOBAL_ARM",
    "GZSL",
    "MAX_EXAMPLES",
    "MODEL_ARM",
    "MULTILABEL",
    "PROTOCOL_TITLES",
    "TRAINING_FREE_ARM",
    "ZSL",
    "ArmResult",
    "Calibration",
    "EvalResult",
    "EvalSettings",
    "Log",
    "Protocol",
    "ProtocolResult",
    "ignore_log",
]
