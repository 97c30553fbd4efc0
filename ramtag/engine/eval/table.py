"""Evaluate a score table (``ramtag tag --all-scores`` output) against labelled images, without a model.

Owns reading such a table (Parquet file, Parquet dataset or JSONL with its metadata sidecar),
matching its rows to annotated images by key, and choosing the protocol its vocabulary fits: a
table holds one vocabulary's scores, so it is evaluated under exactly one protocol.

The vocabulary, the order of the ``scores`` column, comes from the table's metadata. A table can lose it:
pandas, polars and DuckDB drop Parquet schema metadata when they rewrite a table, and ``ramtag tag -o -``
JSONL has no sidecar. Then ``--labels FILE`` (:attr:`EvalSettings.labels`) gives that order, and a row width
that does not match it is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ramtag.data.labelled import LabelledItem, LabelledSource, LabelSpace, normalise_key, resolve_label_space
from ramtag.data.labelled_samples import LabelTally, check_strict_labels, select_items
from ramtag.engine.eval.calibrate import attach_calibration
from ramtag.engine.eval.protocol import arm_result, open_eval_source, protocol_warnings
from ramtag.engine.eval.types import (
    GZSL,
    MAX_EXAMPLES,
    MODEL_ARM,
    MULTILABEL,
    ZSL,
    EvalResult,
    EvalSettings,
    Log,
    Protocol,
    ProtocolResult,
    ignore_log,
)
from ramtag.errors import DataError, OutputError, RamtagError, UsageError, VocabularyError
from ramtag.messages import listed

VOCABULARY_METADATA_KEYS = ("vocabulary", "labels")
"""Where a score table's metadata may hold its vocabulary (a list of labels, or an object with ``labels``)."""


@dataclass
class ScoreTable:
    """Rows of a ``ramtag tag --all-scores`` table: scores of good rows, errors of failed ones."""

    path: str
    vocabulary: tuple[str, ...]
    """The labels of the ``scores`` column, in its order."""
    keys: list[str]
    scores: np.ndarray = field(repr=False)
    """``[len(keys), C]`` float32 scores in vocabulary order."""
    errors: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    vocabulary_from_labels: bool = False
    """The metadata records no vocabulary: :attr:`vocabulary` is the ``--labels`` file's."""

    @property
    def n_rows(self) -> int:
        return len(self.keys) + len(self.errors)

    def fingerprint(self, name: str) -> str | None:
        """A fingerprint recorded in the metadata, at top level or in the run's ``identity``."""
        for place in (self.metadata, self.metadata.get("identity") or {}):
            if isinstance(place, dict) and isinstance(place.get(name), str):
                return place[name]
        vocabulary = self.metadata.get("vocabulary")
        if name == "vocabulary_fingerprint" and isinstance(vocabulary, dict):
            if isinstance(vocabulary.get("fingerprint"), str):
                return vocabulary["fingerprint"]
        return None


# ---------------------------------------------------------------------------------------------
# Reading


LABELS_HINT = "pass --labels FILE: the table's labels, one per line, in the order of its scores column"
"""What to do when a score table's metadata records no vocabulary."""


def recorded_vocabulary(metadata: dict[str, Any]) -> tuple[str, ...] | None:
    """The vocabulary a score table's metadata records (see :data:`VOCABULARY_METADATA_KEYS`), else None."""
    for name in VOCABULARY_METADATA_KEYS:
        value = metadata.get(name)
        if isinstance(value, dict):
            value = value.get("labels")
        if isinstance(value, list) and value and all(isinstance(label, str) for label in value):
            return tuple(value)
    return None


def table_vocabulary(metadata: dict[str, Any], where: str) -> tuple[str, ...]:
    """The vocabulary a score table's metadata records; an error naming ``--labels`` when it records none."""
    vocabulary = recorded_vocabulary(metadata)
    if vocabulary is None:
        raise DataError(
            f"{where}: the table's metadata records no vocabulary (expected a 'vocabulary' list); "
            "was it written by `ramtag tag --all-scores`? If its metadata was lost (pandas, polars and DuckDB "
            f"drop it when they rewrite a table), {LABELS_HINT}"
        )
    return vocabulary


def read_score_table(path: str | os.PathLike, labels: Sequence[str] | None = None) -> ScoreTable:
    """Read a Parquet file, Parquet dataset directory or JSONL table with a ``scores`` column.

    ``labels`` name the ``scores`` column, in its order, when the metadata records no vocabulary; a
    vocabulary the metadata records is used whatever ``labels`` say.
    """
    from ramtag.data.layout import read_table_metadata

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such score table")
    try:
        metadata = read_table_metadata(path)
    except RamtagError as exc:
        raise DataError(str(exc)) from exc
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    vocabulary = recorded_vocabulary(metadata)
    from_labels = vocabulary is None and labels is not None
    if from_labels:
        vocabulary = tuple(labels)
    elif jsonl and not metadata:
        raise DataError(
            f"{path}: no metadata sidecar {path.name}.meta.json beside it, so its vocabulary is unknown; {LABELS_HINT}"
        )
    elif vocabulary is None:
        vocabulary = table_vocabulary(metadata, str(path))
    if jsonl:
        keys, score_lists, errors = _read_jsonl_scores(path)
    else:
        keys, score_lists, errors = _read_parquet_scores(path)
    good_keys: list[str] = []
    good_rows: list[Any] = []
    error_rows: dict[str, str] = {}
    seen: set[str] = set()
    for key, scores, error in zip(keys, score_lists, errors):
        if key in seen:
            raise DataError(f"{path}: key {key!r} appears more than once")
        seen.add(key)
        if error is not None or scores is None:
            error_rows[key] = error or "no scores"
            continue
        good_keys.append(key)
        good_rows.append(scores)
    matrix = _score_matrix(good_rows, good_keys, len(vocabulary), str(path), from_labels)
    return ScoreTable(str(path), vocabulary, good_keys, matrix, error_rows, metadata, from_labels)


def _read_parquet_scores(path: Path) -> tuple[list[str], list[Any], list[str | None]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read as Parquet ({exc})") from exc
    if "scores" not in table.column_names:
        raise DataError(f"{path}: no 'scores' column; write the table with `ramtag tag --all-scores`")
    if "key" not in table.column_names:
        raise DataError(f"{path}: no 'key' column; not a ramtag tag table")
    errors = table["error"].to_pylist() if "error" in table.column_names else [None] * table.num_rows
    return table["key"].to_pylist(), table["scores"].to_pylist(), errors


def _read_jsonl_scores(path: Path) -> tuple[list[str], list[Any], list[str | None]]:
    from ramtag.data.layout import iter_jsonl_rows

    keys, scores, errors = [], [], []
    try:
        for number, row in iter_jsonl_rows(path):
            if "scores" not in row:
                raise DataError(f"{path}:{number}: no 'scores'; write the table with `ramtag tag --all-scores`")
            keys.append(row["key"])
            scores.append(row["scores"])
            errors.append(row.get("error"))
    except OutputError as exc:
        raise DataError(str(exc)) from exc
    return keys, scores, errors


def _score_matrix(rows: list[Any], keys: list[str], width: int, where: str, from_labels: bool) -> np.ndarray:
    matrix = np.zeros((len(rows), width), dtype=np.float32)
    for index, (key, row) in enumerate(zip(keys, rows)):
        if not isinstance(row, (list, tuple)) or len(row) != width:
            size = len(row) if isinstance(row, (list, tuple)) else type(row).__name__
            if from_labels:
                raise DataError(
                    f"{where}: row {key!r} has {size} scores but --labels lists {width} labels; the table's metadata "
                    "records no vocabulary, so --labels must list the table's labels in the order of its scores column"
                )
            raise DataError(f"{where}: row {key!r} has {size} scores for a vocabulary of {width} labels")
        try:
            matrix[index] = row
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: row {key!r} holds a score that is not a number") from exc
    bad = np.isnan(matrix).any(axis=1)
    if bad.any():
        raise DataError(f"{where}: row {keys[int(np.argmax(bad))]!r} has NaN scores")
    return matrix


# ---------------------------------------------------------------------------------------------
# Matching the table to the annotations


def _table_label_space(
    table: ScoreTable, source: LabelledSource, settings: EvalSettings
) -> tuple[LabelSpace, Protocol]:
    vocabulary = table.vocabulary
    if settings.labels is None and source.classes is None:
        space = resolve_label_space(
            LabelledSource(description=source.description, classes=vocabulary), None, settings.unseen
        )
        space = replace(space, origin=f"vocabulary of {table.path}")
    else:
        space = resolve_label_space(source, settings.labels, settings.unseen)
    table_set = set(vocabulary)
    if not space.unseen:
        _require_same_labels(table_set, set(space.labels), table.path, space.origin)
        return space, Protocol(MULTILABEL, vocabulary)
    if table_set == set(space.unseen):
        return space, Protocol(ZSL, vocabulary, require_any=vocabulary)
    if table_set == set(space.labels):
        return space, Protocol(GZSL, vocabulary)
    raise VocabularyError(
        f"{table.path}: its vocabulary ({len(vocabulary)} labels) is neither the {len(space.unseen)} unseen labels "
        f"(ZSL) nor all {len(space.labels)} labels (GZSL); a score table holds one vocabulary's scores, "
        "so evaluate the ZSL and the GZSL tables in separate runs"
    )


def _require_same_labels(table_labels: set[str], truth: set[str], where: str, origin: str) -> None:
    if table_labels == truth:
        return
    missing = sorted(truth - table_labels)
    extra = sorted(table_labels - truth)
    parts = []
    if missing:
        parts.append(f"{len(missing)} label(s) of the {origin} are not scored ({listed(missing)})")
    if extra:
        parts.append(f"{len(extra)} scored label(s) are not in the {origin} ({listed(extra)})")
    raise VocabularyError(f"{where}: the score table's vocabulary does not match the ground truth: {'; '.join(parts)}")


@dataclass
class _Join:
    """Annotated images matched to table rows, and what matched nothing on either side."""

    rows: list[int]
    """The table row of each matched image."""
    keys: list[str]
    """The annotation key of each matched image."""
    targets: list[np.ndarray]
    tally: LabelTally
    not_in_table: list[str]
    """Annotation keys without a row."""
    unmatched: list[str]
    """Table keys without an annotated image (none under ZSL, which leaves images out on purpose)."""


def _join(table: ScoreTable, items: Sequence[LabelledItem], protocol: Protocol, space: LabelSpace) -> _Join:
    """Match rows by key: the annotation key, else its resolved path, both normalised."""
    row_of = {normalise_key(key): row for row, key in enumerate(table.keys)}
    error_of = {normalise_key(key): error for key, error in table.errors.items()}
    column = {label: index for index, label in enumerate(protocol.labels)}
    known = set(space.labels)
    join = _Join(rows=[], keys=[], targets=[], tally=LabelTally(), not_in_table=[], unmatched=[])
    used: set[str] = set()
    for item in items:
        candidates = [normalise_key(item.key)]
        if item.path is not None and item.path != item.key:
            candidates.append(normalise_key(item.path))
        hit = next((key for key in candidates if key in row_of or key in error_of), None)
        join.tally.dropped.update(label for label in item.labels if label not in known)
        if hit is None:
            join.not_in_table.append(item.key)
            continue
        used.add(hit)
        if hit in error_of:
            join.tally.failed.append((item.key, error_of[hit]))
            continue
        target = np.zeros(len(protocol.labels), dtype=np.uint8)
        for label in item.labels:
            if label in column:
                target[column[label]] = 1
        join.rows.append(row_of[hit])
        join.keys.append(item.key)
        join.targets.append(target)
    join.tally.images = len(join.rows)
    if protocol.name != ZSL:  # under ZSL, rows of images without unseen labels are expected to be left out
        join.unmatched = [key for key in table.keys + list(table.errors) if normalise_key(key) not in used]
    return join


def _examples(keys: Sequence[str]) -> list[str]:
    return list(keys[:MAX_EXAMPLES])


def _prefix_hint(table_keys: Sequence[str], annotation_keys: Sequence[str]) -> str | None:
    """The --map-prefix that turns the first annotation keys into table keys, when one prefix does it."""
    keys = set(table_keys)
    for key in annotation_keys[:50]:
        parts = key.split("/")
        for cut in range(1, len(parts)):
            if "/".join(parts[cut:]) in keys:
                return f"try --map-prefix '{'/'.join(parts[:cut])}/='"
    return None


def _coverage(table: ScoreTable, join: _Join) -> dict[str, Any]:
    """How the table and the annotations overlap, for the report."""
    return {
        "table": table.path,
        "table_rows": table.n_rows,
        "table_error_rows": len(table.errors),
        "matched": len(join.rows) + len(join.tally.failed),
        "table_keys_not_in_annotations": len(join.unmatched),
        "table_keys_not_in_annotations_examples": _examples(join.unmatched),
        "annotations_not_in_table": len(join.not_in_table),
        "annotations_not_in_table_examples": _examples(join.not_in_table),
        "metadata": {k: v for k, v in table.metadata.items() if k not in VOCABULARY_METADATA_KEYS},
    }


# ---------------------------------------------------------------------------------------------
# Evaluating


def evaluate_score_table(
    table_path: str | os.PathLike,
    data: Sequence[str] | str,
    settings: EvalSettings,
    *,
    log: Log = ignore_log,
) -> EvalResult:
    """Evaluate the scores of a ``ramtag tag --all-scores`` table against DATA, without a model.

    Rows join annotation images by key: the annotation path after ``--map-prefix``, relative to
    ``--root`` (or, failing that, the resolved path). Unmatched keys on either side are counted
    and reported; no match at all is an error.
    """
    if settings.baseline:
        raise UsageError("--baseline needs a model; a score table holds one scorer's scores")
    table = read_score_table(table_path, settings.labels)
    source = open_eval_source(data, settings)
    space, protocol = _table_label_space(table, source, settings)
    labelled = source.labelled_items(space.labels)
    if settings.strict_labels:
        check_strict_labels(labelled, space.labels, source.description)
    items = [item for _, item in select_items(labelled, protocol.require_any)]
    if not items:
        raise DataError(f"{source.description}: no image has any of the {len(protocol.labels)} unseen labels")
    join = _join(table, items, protocol, space)
    coverage = _coverage(table, join)
    if not join.rows:
        hint = _prefix_hint(table.keys, [item.key for item in items])
        raise DataError(
            f"no row of {table.path} matches an image of {source.description}: table keys look like "
            f"{_examples(table.keys)[:3]}, annotation keys like {[item.key for item in items[:3]]}; "
            + (hint or "set --root to the folder the table's keys are relative to, and --map-prefix OLD=NEW "
                       "for paths written on another machine")
        )
    target_matrix = np.stack(join.targets)
    join.tally.images_without_labels = int((target_matrix.sum(axis=1) == 0).sum())
    scores = table.scores[np.array(join.rows)]
    arm = arm_result(MODEL_ARM, protocol, scores, target_matrix, space, settings.ks)
    arm.label = "score table"
    result_protocol = ProtocolResult(protocol, join.keys, target_matrix, {MODEL_ARM: arm}, join.tally)
    warnings: list[str] = []
    if join.not_in_table:
        warnings.append(
            f"{len(join.not_in_table)} of {len(items)} annotated image(s) have no row in the score table and are "
            f"not evaluated, e.g. {join.not_in_table[:3]}"
        )
    if join.unmatched:
        warnings.append(
            f"{len(join.unmatched)} row(s) of the score table match no annotated image, e.g. {join.unmatched[:3]}"
        )
    warnings.extend(protocol_warnings(result_protocol))
    for message in warnings:
        log(message)
    result = EvalResult(
        protocols={protocol.name: result_protocol},
        label_space=space,
        data=source.description,
        model={
            "score_table": table.path,
            "fingerprint": table.fingerprint("model_fingerprint"),
            "vocabulary_fingerprint": table.fingerprint("vocabulary_fingerprint"),
        },
        settings=settings,
        warnings=warnings,
        notes=[f"{table.path}: its metadata records no vocabulary; its scores are in the order of --labels"]
        if table.vocabulary_from_labels
        else [],
        score_table=coverage,
    )
    if settings.calibrate:
        vocabulary_fingerprint = table.fingerprint("vocabulary_fingerprint")
        model_fingerprint = table.fingerprint("model_fingerprint")
        if vocabulary_fingerprint is None or model_fingerprint is None:
            raise UsageError(
                f"{table.path} records no vocabulary and model fingerprints, so thresholds fitted on it could not "
                "be checked by `ramtag tag --thresholds`; calibrate with the model instead (--checkpoint ...)"
            )
        attach_calibration(
            result, vocabulary_fingerprint=vocabulary_fingerprint, model_fingerprint=model_fingerprint, log=log
        )
    return result


__all__ = [
    "VOCABULARY_METADATA_KEYS",
    "LABELS_HINT",
    "ScoreTable",
    "evaluate_score_table",
    "read_score_table",
    "recorded_vocabulary",
    "table_vocabulary",
]
