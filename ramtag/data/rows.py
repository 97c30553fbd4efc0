"""Rows of a tag table: the schema, batches of rows, Arrow record batches and JSON lines."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ramtag.errors import UsageError
from ramtag.selection import Selection

METADATA_KEY = b"ramtag"
TAG_TYPE = pa.list_(pa.struct([pa.field("label", pa.string()), pa.field("score", pa.float32())]))
SCORES_TYPE = pa.list_(pa.float32())
_RESERVED = ("key", "source", "tags", "error", "scores")

# ---------------------------------------------------------------------------------------------
# Schema and batches


def table_schema(extra_schema: pa.Schema | None = None, all_scores: bool = False) -> pa.Schema:
    """Columns of a tag table: key, source, tags, error, [scores], then carried columns."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("tags", TAG_TYPE),
        pa.field("error", pa.string()),
    ]
    if all_scores:
        fields.append(pa.field("scores", SCORES_TYPE))
    for extra in extra_schema or []:
        if extra.name in _RESERVED:
            raise UsageError(f"carried column {extra.name!r} clashes with an output column")
        fields.append(pa.field(extra.name, extra.type))
    return pa.schema(fields)


@dataclass
class TagBatch:
    """Rows to write. Tags are flattened like :class:`~ramtag.selection.Selection`."""

    keys: Sequence[str]
    sources: Sequence[str]
    errors: Sequence[str | None]
    tag_counts: np.ndarray
    tag_labels: np.ndarray
    tag_scores: np.ndarray
    scores: np.ndarray | None = None
    """``[N, C]`` scores in vocabulary order (written with ``all_scores``; ignored for error rows)."""
    extra: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_selection(
        cls,
        keys: Sequence[str],
        sources: Sequence[str],
        selection: Selection,
        scores: Any | None = None,
        extra: Mapping[str, Sequence[Any]] | None = None,
    ) -> TagBatch:
        """Rows of images that were scored."""
        if len(selection) != len(keys):
            raise ValueError(f"{len(selection)} selections for {len(keys)} keys")
        return cls(
            keys=list(keys),
            sources=list(sources),
            errors=[None] * len(keys),
            tag_counts=np.asarray(selection.counts, dtype=np.int64),
            tag_labels=np.asarray(selection.labels, dtype=np.int64),
            tag_scores=np.asarray(selection.scores, dtype=np.float32),
            scores=None if scores is None else np.asarray(scores, dtype=np.float32),
            extra=dict(extra or {}),
        )

    @classmethod
    def from_failures(
        cls,
        keys: Sequence[str],
        sources: Sequence[str],
        errors: Sequence[str],
        extra: Mapping[str, Sequence[Any]] | None = None,
    ) -> TagBatch:
        """Rows of inputs that could not be tagged (each ``error`` a one-line reason)."""
        n_rows = len(keys)
        return cls(
            keys=list(keys),
            sources=list(sources),
            errors=list(errors),
            tag_counts=np.zeros(n_rows, dtype=np.int64),
            tag_labels=np.zeros(0, dtype=np.int64),
            tag_scores=np.zeros(0, dtype=np.float32),
            extra=dict(extra or {}),
        )


def _offsets(counts: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())


def batch_to_arrow(batch: TagBatch, labels: pa.Array, schema: pa.Schema) -> pa.RecordBatch:
    """Build one Arrow record batch; label names come from ``labels`` by index (vectorised)."""
    n_rows = len(batch)
    error_mask = np.array([error is not None for error in batch.errors], dtype=bool)
    tag_values = pa.StructArray.from_arrays(
        [labels.take(pa.array(batch.tag_labels, pa.int64())), pa.array(batch.tag_scores, pa.float32())],
        fields=list(TAG_TYPE.value_type),
    )
    columns: dict[str, pa.Array] = {
        "key": pa.array(batch.keys, pa.string()),
        "source": pa.array(batch.sources, pa.string()),
        "tags": pa.ListArray.from_arrays(_offsets(batch.tag_counts), tag_values, type=TAG_TYPE),
        "error": pa.array(batch.errors, pa.string()),
    }
    if "scores" in schema.names:
        if batch.scores is None:
            columns["scores"] = pa.nulls(n_rows, SCORES_TYPE)
        else:
            matrix = np.asarray(batch.scores, dtype=np.float32)
            counts = np.where(error_mask, 0, matrix.shape[1])
            values = pa.array(matrix[~error_mask].reshape(-1), pa.float32())
            columns["scores"] = pa.ListArray.from_arrays(
                _offsets(counts), values, type=SCORES_TYPE, mask=pa.array(error_mask)
            )
    for extra_field in schema:
        if extra_field.name in columns:
            continue
        values = batch.extra.get(extra_field.name)
        columns[extra_field.name] = (
            pa.nulls(n_rows, extra_field.type) if values is None else pa.array(list(values), extra_field.type)
        )
    return pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)


def _json_floats(values: np.ndarray) -> list[str]:
    """float32 values as JSON numbers, each with the fewest significant digits (up to 9) that read back exactly."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    doubles = values.astype(np.float64)
    digits = np.full(values.shape, 9, dtype=np.int64)  # 9 always reads back exactly
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        magnitude = np.floor(np.log10(np.abs(doubles)))
        for candidate in range(8, 0, -1):  # vectorised rounding decides; formatting happens once
            scale = 10.0 ** (candidate - 1 - magnitude)
            exact = (np.round(doubles * scale) / scale).astype(np.float32) == values
            digits[exact] = candidate
    digits[doubles == 0] = 1
    texts = ["%.*g" % pair for pair in zip(digits.tolist(), doubles.tolist())]
    for index in np.flatnonzero(~finite):
        texts[index] = "null"  # JSON has no NaN or infinity
    return texts


def _list_json(array: pa.ListArray, element: Any) -> list[str]:
    """Per row, the JSON text of a list column; ``element(start, stop)`` renders its items."""
    offsets = array.offsets.to_numpy()
    offsets = offsets - offsets[0]
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [
        element(int(offsets[row]), int(offsets[row + 1])) if valid[row] else "null" for row in range(len(array))
    ]


def rows_to_jsonl(table: pa.Table | pa.RecordBatch) -> str:
    """JSON lines for a tag table, columns in table order; float32 scores in short exact form."""
    if isinstance(table, pa.Table):
        table = (
            table.combine_chunks().to_batches()[0]
            if table.num_rows
            else pa.RecordBatch.from_pylist([], schema=table.schema)
        )
    rendered: dict[str, list[str]] = {}
    for name in table.schema.names:
        column = table.column(name)
        if name == "tags":
            tags = column.flatten()
            labels = [json.dumps(label, ensure_ascii=False) for label in tags.field("label").to_pylist()]
            scores = _json_floats(tags.field("score").to_numpy(zero_copy_only=False))
            rendered[name] = _list_json(
                column,
                lambda start, stop: "["
                + ",".join(f'{{"label":{labels[i]},"score":{scores[i]}}}' for i in range(start, stop))
                + "]",
            )
        elif name == "scores":
            values = _json_floats(column.flatten().to_numpy(zero_copy_only=False))
            rendered[name] = _list_json(column, lambda start, stop: "[" + ",".join(values[start:stop]) + "]")
        else:
            rendered[name] = [json.dumps(value, ensure_ascii=False, default=str) for value in column.to_pylist()]
    keys = [json.dumps(name, ensure_ascii=False) + ":" for name in table.schema.names]
    columns = [rendered[name] for name in table.schema.names]
    return "".join(
        "{" + ",".join(key + values[row] for key, values in zip(keys, columns)) + "}\n" for row in range(table.num_rows)
    )


def schema_with_metadata(schema: pa.Schema, metadata: Mapping[str, Any]) -> pa.Schema:
    """``schema`` carrying the run's metadata under the ``ramtag`` key."""
    return schema.with_metadata({METADATA_KEY: json.dumps(dict(metadata), ensure_ascii=False, default=str)})
