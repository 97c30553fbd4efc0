"""Calibration after an evaluation: per-label thresholds fitted on its scores, and their file.

Thresholds are fitted on the protocol that scores the whole vocabulary (GZSL, else the only
one), carry the vocabulary and model fingerprints, and are written in the format
``ramtag tag --thresholds`` reads. The threshold math itself is :mod:`ramtag.calibration`; the
:class:`~ramtag.engine.eval.types.Calibration` this fills is one of the evaluation's types.
"""

from __future__ import annotations

import os
from pathlib import Path

from ramtag.calibration import STATUS_NO_POSITIVES, STATUS_PRECISION_UNREACHABLE, fit_thresholds
from ramtag.data.thresholds import write_thresholds
from ramtag.engine.eval.protocol import quoted_examples
from ramtag.engine.eval.types import GZSL, MODEL_ARM, MULTILABEL, ZSL, Calibration, EvalResult, Log, ProtocolResult
from ramtag.errors import DataError, UsageError


def calibration_protocol(protocols: dict[str, ProtocolResult]) -> ProtocolResult:
    """The protocol thresholds are fitted on: GZSL, else multi-label, else ZSL."""
    for name in (GZSL, MULTILABEL, ZSL):
        if name in protocols:
            return protocols[name]
    raise DataError("nothing to calibrate on")


def fit_calibration(
    result: EvalResult,
    *,
    vocabulary_fingerprint: str | None,
    model_fingerprint: str | None,
    arm: str = MODEL_ARM,
) -> Calibration:
    """Fit thresholds on the protocol that scores the whole vocabulary (GZSL, else the only one)."""
    protocol = calibration_protocol(result.protocols)
    scores = protocol.arms[arm].scores
    thresholds = fit_thresholds(scores, protocol.targets, target_precision=result.settings.target_precision)
    return Calibration(
        protocol=protocol.name,
        arm=arm,
        labels=protocol.labels,
        thresholds=thresholds,
        vocabulary_fingerprint=vocabulary_fingerprint,
        model_fingerprint=model_fingerprint,
        n_images=int(scores.shape[0]),
    )


def calibration_warnings(calibration: Calibration) -> list[str]:
    """Labels that got no threshold (``inf``: never tagged), and why."""
    out = []
    for status, why in (
        (STATUS_NO_POSITIVES, "have no positive image"),
        (STATUS_PRECISION_UNREACHABLE, f"never reach precision {calibration.thresholds.target_precision}"),
    ):
        indices = calibration.thresholds.labels_with_status(status)
        if indices:
            names = quoted_examples([calibration.labels[i] for i in indices])
            out.append(f"calibration: {len(indices)} label(s) {why}: threshold inf (never tagged): {names}")
    return out


def attach_calibration(
    result: EvalResult, *, vocabulary_fingerprint: str | None, model_fingerprint: str | None, log: Log
) -> None:
    """Fit ``result.calibration`` and add its warnings to ``result.warnings`` and to ``log``."""
    result.calibration = fit_calibration(
        result, vocabulary_fingerprint=vocabulary_fingerprint, model_fingerprint=model_fingerprint
    )
    for message in calibration_warnings(result.calibration):
        result.warnings.append(message)
        log(message)


def write_calibration(path: str | os.PathLike, calibration: Calibration) -> Path:
    """Write the thresholds in the format ``ramtag tag --thresholds`` reads."""
    if calibration.vocabulary_fingerprint is None or calibration.model_fingerprint is None:
        raise UsageError("cannot write thresholds without the vocabulary and model fingerprints")
    info: dict[str, object] = {
        "objective": calibration.thresholds.objective,
        "protocol": calibration.protocol,
        "calibration_images": calibration.n_images,
        "written_by": "ramtag eval --calibrate",
    }
    if calibration.thresholds.target_precision is not None:
        info["target_precision"] = calibration.thresholds.target_precision
    write_thresholds(
        path,
        calibration.labels,
        calibration.thresholds.thresholds,
        vocabulary_fingerprint=calibration.vocabulary_fingerprint,
        model_fingerprint=calibration.model_fingerprint,
        info=info,
    )
    return Path(path)


__all__ = [
    "attach_calibration",
    "calibration_protocol",
    "calibration_warnings",
    "fit_calibration",
    "write_calibration",
]
