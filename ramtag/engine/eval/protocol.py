"""The steps every scorer shares: open the annotated data, plan the protocols, one arm's metrics, the warnings.

A model (:mod:`ramtag.engine.eval.model`) and a score table (:mod:`ramtag.engine.eval.table`) both score
through these, so the two report the same figures and the same problems in the same words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ramtag.data.labelled import LabelledSource, LabelSpace, open_labelled_source
from ramtag.engine.eval.types import (
    GZSL,
    MAX_EXAMPLES,
    MULTILABEL,
    ZSL,
    ArmResult,
    EvalSettings,
    Protocol,
    ProtocolResult,
)
from ramtag.errors import DataError
from ramtag.messages import listed
from ramtag.metrics import MetricsReport, evaluate_scores


def open_eval_source(data: Sequence[str] | str, settings: EvalSettings) -> LabelledSource:
    """DATA's annotated images, with the settings' ``--root`` and ``--map-prefix`` applied."""
    return open_labelled_source(data, root=settings.root, prefix_map=list(settings.prefix_map))


def plan_protocols(space: LabelSpace) -> list[Protocol]:
    """ZSL and GZSL when unseen labels are declared, else one multi-label evaluation."""
    if not space.unseen:
        return [Protocol(MULTILABEL, space.labels)]
    return [Protocol(ZSL, space.unseen, require_any=space.unseen), Protocol(GZSL, space.labels)]


def quoted_examples(names: Sequence[str]) -> str:
    """The first :data:`MAX_EXAMPLES` names, quoted, and how many more there are."""
    return listed(names, MAX_EXAMPLES)


def _metrics(protocol: Protocol, scores: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> MetricsReport:
    if scores.shape[0] == 0:
        raise DataError(f"{protocol.title}: no image could be evaluated (every image failed or was skipped)")
    return evaluate_scores(scores, targets, ks=ks, label_names=protocol.labels)


def _group_map(metrics: MetricsReport, labels: Sequence[str], group: Sequence[str]) -> float | None:
    wanted = set(group)
    mask = np.array([label in wanted for label in labels]) & metrics.evaluated
    return float(metrics.ap[mask].mean()) if mask.any() else None


def arm_result(
    name: str, protocol: Protocol, scores: np.ndarray, targets: np.ndarray, space: LabelSpace, ks: Sequence[int]
) -> ArmResult:
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


__all__ = ["arm_result", "open_eval_source", "plan_protocols", "protocol_warnings", "quoted_examples"]
