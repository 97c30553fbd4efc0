"""Per-label thresholds files: a TSV tied to one vocabulary and one model by fingerprints.

Format (UTF-8)::

    # ramtag thresholds
    # vocabulary_fingerprint: 3f1c9a0b2d4e5f60
    # model_fingerprint: 0a1b2c3d4e5f6071
    # objective: f1                      (any further "# name: value" lines are kept as info)
    label<TAB>threshold
    dog<TAB>0.0412
    cat<TAB>inf                          (inf: never tagged)

The ``label<TAB>threshold`` header line is optional when reading. A file is refused for another
vocabulary or model, and when it does not give exactly one threshold per vocabulary label.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ramtag.atomic import write_text
from ramtag.errors import DataError, VocabularyError

_FINGERPRINTS = ("vocabulary_fingerprint", "model_fingerprint")


@dataclass
class ThresholdsFile:
    """The parsed file: thresholds by label (file order) and its header fields."""

    thresholds: dict[str, float]
    vocabulary_fingerprint: str | None
    model_fingerprint: str | None
    info: dict[str, str] = field(default_factory=dict)

    def for_vocabulary(
        self,
        labels: Sequence[str],
        vocabulary_fingerprint: str,
        model_fingerprint: str,
        *,
        source: str = "thresholds file",
    ) -> np.ndarray:
        """Thresholds ``[C]`` in vocabulary order, after checking both fingerprints and the label set."""
        for name, expected in zip(_FINGERPRINTS, (vocabulary_fingerprint, model_fingerprint)):
            found = getattr(self, name)
            if found is None:
                raise VocabularyError(f"{source}: no '# {name}:' header line; it cannot be checked against the model")
            if found != expected:
                what = "vocabulary" if name.startswith("vocabulary") else "model"
                raise VocabularyError(
                    f"{source} was made for another {what} ({name} {found}, this run has {expected})"
                )
        missing = [label for label in labels if label not in self.thresholds]
        if missing:
            raise VocabularyError(f"{source}: no threshold for {len(missing)} label(s), e.g. {missing[0]!r}")
        extra = set(self.thresholds).difference(labels)
        if extra:
            raise VocabularyError(f"{source}: {len(extra)} label(s) not in the vocabulary, e.g. {sorted(extra)[0]!r}")
        return np.array([self.thresholds[label] for label in labels], dtype=np.float32)


def read_thresholds(path: str | os.PathLike) -> ThresholdsFile:
    """Parse a thresholds file; malformed lines raise :class:`DataError` naming the line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such thresholds file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read thresholds ({exc})") from exc
    header: dict[str, str] = {}
    thresholds: dict[str, float] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("#"):
            name, colon, value = line[1:].partition(":")
            if colon:
                header[name.strip()] = value.strip()
            continue
        label, tab, value = line.rstrip("\r\n").rpartition("\t")
        if not tab:
            raise DataError(f"{path}:{number}: expected label<TAB>threshold")
        label = label.strip()
        if not thresholds and label == "label" and value.strip() == "threshold":
            continue
        try:
            threshold = float(value)
        except ValueError:
            raise DataError(f"{path}:{number}: threshold {value.strip()!r} is not a number") from None
        if math.isnan(threshold):
            raise DataError(f"{path}:{number}: threshold is NaN")
        if label in thresholds:
            raise DataError(f"{path}:{number}: label {label!r} repeats line {first_line[label]}")
        thresholds[label] = threshold
        first_line[label] = number
    if not thresholds:
        raise DataError(f"{path}: no thresholds in file")
    return ThresholdsFile(
        thresholds,
        header.pop("vocabulary_fingerprint", None),
        header.pop("model_fingerprint", None),
        header,
    )


def write_thresholds(
    path: str | os.PathLike,
    labels: Sequence[str],
    thresholds: Sequence[float] | np.ndarray,
    *,
    vocabulary_fingerprint: str,
    model_fingerprint: str,
    info: Mapping[str, object] | None = None,
) -> None:
    """Write a thresholds file atomically; ``info`` adds ``# name: value`` header lines."""
    values = np.asarray(thresholds, dtype=np.float64)
    if values.shape != (len(labels),):
        raise ValueError(f"{values.shape[0] if values.ndim else 0} thresholds for {len(labels)} labels")
    lines = [
        "# ramtag thresholds",
        f"# vocabulary_fingerprint: {vocabulary_fingerprint}",
        f"# model_fingerprint: {model_fingerprint}",
    ]
    for name, value in (info or {}).items():
        if "\n" in f"{name}{value}" or ":" in str(name):
            raise ValueError(f"header field {name!r} must be one line without ':' in its name")
        lines.append(f"# {name}: {value}")
    lines.append("label\tthreshold")
    for label, value in zip(labels, values):
        if "\t" in label or "\n" in label:
            raise ValueError(f"label {label!r} holds a tab or newline")
        lines.append(f"{label}\t{_format_threshold(value)}")
    write_text(path, "\n".join(lines) + "\n")


def _format_threshold(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(float(value))
