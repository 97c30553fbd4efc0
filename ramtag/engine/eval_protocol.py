"""What an evaluation is: its settings, protocols and arms, and the results every scorer fills.

Both ways of scoring (a model, :mod:`ramtag.engine.evaluate`; a score table,
:mod:`ramtag.engine.score_table`) share these types and steps, and :mod:`ramtag.engine.report`
renders the :class:`EvalResult` they return.

Protocols, as the reference defines them (its COCO ``test_17`` file is exactly the images of
``test_65`` that carry one of the 17 unseen labels, with only those labels kept):

* ``zsl``: the model scores the unseen labels only; images with at least one unseen label.
* ``gzsl``: the model scores seen plus unseen labels; every image.
* ``multilabel`` (no unseen list): the model scores the whole label space; every image.

Images without any label in a protocol's label set stay as negatives for every label, as the
reference's loader keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ramtag.engine.labelled import LabelledSource, LabelSpace, LabelTally, open_labelled_source
from ramtag.errors import DataError, UsageError
from ramtag.metrics import MetricsReport, evaluate_scores

if TYPE_CHECKING:
    from ramtag.engine.calibrate import Calibration

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
    """The whole label space (seen plus unseen), in vocabulary order; default: from the data."""
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


def open_eval_source(data: Sequence[str] | str, settings: EvalSettings) -> LabelledSource:
    """DATA's annotated images, with the settings' ``--root`` and ``--map-prefix`` applied."""
    return open_labelled_source(data, root=settings.root, prefix_map=list(settings.prefix_map))


@dataclass(frozen=True)
class Protocol:
    name: str
    labels: tuple[str, ...]
    require_any: tuple[str, ...] | None = None
    """Only images with at least one of these labels (ZSL: the unseen labels)."""

    @property
    def title(self) -> str:
        return PROTOCOL_TITLES.get(self.name, self.name)


def plan_protocols(space: LabelSpace) -> list[Protocol]:
    """ZSL and GZSL when unseen labels are declared, else one multi-label evaluation."""
    if not space.unseen:
        return [Protocol(MULTILABEL, space.labels)]
    return [Protocol(ZSL, space.unseen, require_any=space.unseen), Protocol(GZSL, space.labels)]


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
class EvalResult:
    """Everything rank 0 knows after an evaluation; :mod:`ramtag.engine.report` renders it."""

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


# ---------------------------------------------------------------------------------------------
# Steps shared by every scorer


def quoted_examples(names: Sequence[str]) -> str:
    """The first :data:`MAX_EXAMPLES` names, quoted, and how many more there are."""
    shown = ", ".join(map(repr, names[:MAX_EXAMPLES]))
    more = f" and {len(names) - MAX_EXAMPLES} more" if len(names) > MAX_EXAMPLES else ""
    return f"{shown}{more}"


def _metrics(protocol: Protocol, scores: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> MetricsReport:
    if scores.shape[0] == 0:
        raise DataError(f"{protocol.title}: no image could be evaluated (every image failed or was skipped)")
    return evaluate_scores(scores, targets, ks=ks, label_names=protocol.labels)


def _group_map(metrics: MetricsReport, labels: Sequence[str], group: Sequence[str]) -> float | None:
    wanted = set(group)
    mask = np.array([label in wanted for label in labels]) & metrics.evaluated
    return float(metrics.ap[mask].mean()) if mask.any() else None


def arm_result(name: str, protocol: Protocol, scores: np.ndarray, targets: np.ndarray, space: LabelSpace, ks: Sequence[int]) -> ArmResult:
    """One arm's metrics under ``protocol``; GZSL adds the mAP of the seen and of the unseen half."""
    metrics = _metrics(protocol, scores, targets, ks)
    extra: dict[str, float | None] = {}
    if protocol.name == GZSL:  # how the all-label ranking serves each half
        extra["mAP_seen"] = _group_map(metrics, protocol.labels, space.seen)
        extra["mAP_unseen"] = _group_map(metrics, protocol.labels, space.unseen)
    return ArmResult(name, metrics, scores, extra)


def protocol_warnings(result: ProtocolResult) -> list[str]:
    """The tally's messages and the labels left out of mAP, each prefixed with the protocol."""
    title = result.protocol.title
    out = [f"{title}: {message}" for message in result.tally.messages()]
    metrics = next(iter(result.arms.values())).metrics
    missing = metrics.labels_without_positives
    if missing:
        out.append(
            f"{title}: {len(missing)} of {metrics.n_labels} label(s) have no positive image and are left out "
            f"of mAP (their AP is undefined): {quoted_examples(missing)}"
        )
    return out


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
    "EvalResult",
    "EvalSettings",
    "Log",
    "Protocol",
    "ProtocolResult",
    "arm_result",
    "ignore_log",
    "open_eval_source",
    "plan_protocols",
    "protocol_warnings",
    "quoted_examples",
]
