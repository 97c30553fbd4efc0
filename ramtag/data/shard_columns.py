"""Columns carried from WebDataset shard samples: members, fields of the ``.json`` member, the sample's key.

``--keep-columns`` names, for shards:

- a member by its suffix (``txt``, ``cls``, ``caption``): written as text (UTF-8, trimmed), in a column of that name;
- a field of the ``json`` member (``json.url``, ``json.meta.width``): written in a column named by its last part
  (``url``, ``width``); strings as they are, other values as JSON text (``256``, ``true``), so one column has
  one type whatever the samples hold;
- ``__key__``: the sample's own key (img2dataset's ``key``, without the shard name), as column ``sample_key``.

A name is checked against the first sample of the first shard when the run is planned: one that sample lacks
is refused there. A later sample that lacks it gets a null.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ramtag.data.image_tables import output_column
from ramtag.errors import UsageError

SAMPLE_KEY = "__key__"
SAMPLE_KEY_COLUMN = "sample_key"
_JSON_PREFIX = "json."


@dataclass(frozen=True)
class ShardColumn:
    """One ``--keep-columns`` name for shards and the output column it fills."""

    name: str
    column: str

    def value(self, sample: Mapping[str, Any]) -> str | None:
        if self.name == SAMPLE_KEY:
            return str(sample.get(SAMPLE_KEY))
        if self.name.startswith(_JSON_PREFIX):
            return _json_field(sample, self.name[len(_JSON_PREFIX) :].split("."))
        data = sample.get(self.name)
        if data is None:
            return None
        return data.decode("utf-8", "replace").strip() if isinstance(data, bytes) else str(data)


def parse_shard_columns(names: Sequence[str]) -> list[ShardColumn]:
    """The shard columns for ``names``; two names that would fill one column are refused."""
    columns = []
    for name in names:
        if name == SAMPLE_KEY:
            column = SAMPLE_KEY_COLUMN
        elif name.startswith(_JSON_PREFIX) and len(name) > len(_JSON_PREFIX):
            column = output_column(name.rsplit(".", 1)[1])
        else:
            column = output_column(name)
        columns.append(ShardColumn(name, column))
    seen: dict[str, str] = {}
    for column in columns:
        if column.column in seen:
            raise UsageError(
                f"--keep-columns {seen[column.column]} and {column.name} would both be written as column "
                f"{column.column}; keep one of them"
            )
        seen[column.column] = column.name
    return columns


def shard_columns_schema(columns: Sequence[ShardColumn]) -> pa.Schema:
    return pa.schema([pa.field(column.column, pa.string()) for column in columns])


def sample_values(sample: Mapping[str, Any], columns: Sequence[ShardColumn]) -> dict[str, Any]:
    return {column.column: column.value(sample) for column in columns}


def check_sample_has(sample: Mapping[str, Any], columns: Sequence[ShardColumn], where: str) -> None:
    """Refuse names the sample has no member or JSON field for, listing what it has."""
    missing = [column.name for column in columns if column.name != SAMPLE_KEY and column.value(sample) is None]
    if not missing:
        return
    members = sorted(name for name in sample if not name.startswith("__"))
    fields = sorted(_json_document(sample) or {}) if isinstance(_json_document(sample), dict) else []
    has_fields = f"; JSON fields: {', '.join(fields)}" if fields else ""
    raise UsageError(
        f"--keep-columns {', '.join(missing)}: the first sample of {where} has no such member or JSON field "
        f"(members: {', '.join(members)}{has_fields}); name members by suffix (txt), JSON fields as json.FIELD, "
        "the sample key as __key__"
    )


def _json_document(sample: Mapping[str, Any]) -> Any:
    data = sample.get("json")
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def _json_field(sample: Mapping[str, Any], path: Sequence[str]) -> str | None:
    value = _json_document(sample)
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
