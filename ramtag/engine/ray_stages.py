"""The two Ray Data stages of ``ramtag tag --ray``: decode units (CPU tasks), score them (an actor pool).

Rows travel between the stages as Arrow tables of :data:`DECODED` columns: ``unit`` and ``seq`` (the row's
place in its unit, which the driver uses to drop a row that a retried task sends twice), key, source, error,
the carried manifest columns pickled in ``extra``, and the decoded image as raw float32 in ``image``. The last
row of each unit is its *end marker*: ``end`` holds the pickled :class:`~ramtag.data.units.UnitEnd` and the
number of rows the unit sent, so the driver knows when every row of the unit has arrived.

Both stages import nothing from Ray: Ray pickles them (by reference: workers need ramtag installed).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ramtag.data.records import Record, Transform
from ramtag.data.units import UnitDataset, UnitEnd, UnitTask

DECODED = pa.schema(
    [
        pa.field("unit", pa.int64()),
        pa.field("seq", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("error", pa.string()),
        pa.field("extra", pa.binary()),
        pa.field("image", pa.binary()),
        pa.field("shape", pa.list_(pa.int32())),
        pa.field("end", pa.binary()),
    ]
)
SCORED_COLUMNS = ("tag_labels", "tag_scores", "scores")


@dataclass(frozen=True)
class RuntimeSpec:
    """What an actor loads: the arguments of :func:`~ramtag.engine.runtime.load_runtime`."""

    checkpoint: str | None
    model: str
    pretrained: str | None
    device: str = "auto"
    overrides: dict = field(default_factory=dict)

    def load(self):
        from ramtag.engine.runtime import load_runtime

        return load_runtime(self.checkpoint, self.model, self.pretrained, self.device, self.overrides)


def describe_task(task: UnitTask) -> dict:
    """A unit descriptor, one row of the dataset Ray Data runs over (pickled: its drop lists vary in shape)."""
    return {"unit": task.unit.id, "task": pickle.dumps(task)}


def _decoded_table(records: Sequence[Record], first_seq: int) -> pa.Table:
    images, shapes = [], []
    for record in records:
        if record.image is None:
            images.append(b"")
            shapes.append([])
        else:
            array = record.image.numpy()
            images.append(np.ascontiguousarray(array, dtype=np.float32).tobytes())
            shapes.append(list(array.shape))
    return pa.table(
        {
            "unit": [record.unit for record in records],
            "seq": list(range(first_seq, first_seq + len(records))),
            "key": [record.key for record in records],
            "source": [record.source for record in records],
            "error": [None if record.image is not None else (record.error or "cannot decode") for record in records],
            "extra": [pickle.dumps(record.extra) for record in records],
            "image": images,
            "shape": shapes,
            "end": [b""] * len(records),
        },
        schema=DECODED,
    )


def _end_table(end: UnitEnd, rows: int) -> pa.Table:
    return pa.table(
        {
            "unit": [end.unit],
            "seq": [-1],
            "key": [""],
            "source": [""],
            "error": [None],
            "extra": [b""],
            "image": [b""],
            "shape": [[]],
            "end": [pickle.dumps((end, rows))],
        },
        schema=DECODED,
    )


def decode_units(
    descriptors: pa.Table,
    *,
    work_dir: str,
    listing: str,
    transform: Transform,
    max_pixels: int | None,
    draft_size: int | None,
    block_rows: int,
) -> Iterator[pa.Table]:
    """Ray Data task: read each unit with ramtag's own unit reader (every input keeps its row: a bad image
    becomes an error row, never a dropped row or a failed task), in tables of ``block_rows`` rows."""
    for blob in descriptors["task"].to_pylist():
        task: UnitTask = pickle.loads(blob)
        reader = UnitDataset([task], Path(work_dir), Path(listing), transform, max_pixels=max_pixels,
                             draft_size=draft_size)
        pending: list[Record] = []
        sent = 0
        for item in reader.read_unit(task):
            if isinstance(item, UnitEnd):
                if pending:
                    yield _decoded_table(pending, sent)
                    sent += len(pending)
                yield _end_table(item, sent)
                break
            pending.append(item)
            if len(pending) >= block_rows:
                yield _decoded_table(pending, sent)
                sent += len(pending)
                pending = []


class Scorer:
    """Ray Data actor: loads the model once, scores the decoded rows of a batch, passes the others through.

    Output: the decoded columns without the image, plus ``tag_labels`` and ``tag_scores`` (the selected tags,
    best first, as vocabulary indices) and, with ``all_scores``, ``scores`` (every label)."""

    def __init__(
        self,
        spec: RuntimeSpec,
        features: np.ndarray,
        fingerprint: str,
        *,
        top_k: int,
        threshold: float | None,
        thresholds: Any | None,
        all_scores: bool,
        precision: str,
    ) -> None:
        import torch

        from ramtag.engine.runtime import autocast_dtype

        self.runtime = spec.load()
        if self.runtime.fingerprint != fingerprint:  # e.g. a node holding another file under the same path
            raise RuntimeError(
                f"the model this Ray worker loaded ({self.runtime.fingerprint}) is not the driver's ({fingerprint}); "
                "give every node the same checkpoint"
            )
        self.features = torch.from_numpy(np.array(features, dtype=np.float32)).to(self.runtime.device)
        self.autocast = autocast_dtype(precision, self.runtime.device)
        self.top_k, self.threshold, self.thresholds = top_k, threshold, thresholds
        self.all_scores = all_scores

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from ramtag.selection import select_tags

        rows = batch.num_rows
        has_image = pc.greater(pc.binary_length(batch["image"]), 0).to_pylist()
        good = [index for index in range(rows) if has_image[index]]
        counts = np.zeros(rows, dtype=np.int64)
        labels = np.zeros(0, dtype=np.int64)
        values = np.zeros(0, dtype=np.float32)
        every = None
        if good:
            images, shapes = batch["image"].to_pylist(), batch["shape"].to_pylist()
            tensors = [np.frombuffer(images[i], dtype=np.float32).reshape(shapes[i]) for i in good]
            inputs = torch.from_numpy(np.stack(tensors)).to(self.runtime.device)
            scores = self.runtime.score(inputs, self.features, self.autocast).scores.float()
            selection = select_tags(scores, top_k=self.top_k, threshold=self.threshold, per_label=self.thresholds)
            counts[good] = selection.counts
            labels = np.asarray(selection.labels, dtype=np.int64)
            values = np.asarray(selection.scores, dtype=np.float32)
            if self.all_scores:
                every = scores.cpu().numpy().astype(np.float32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        out = batch.drop_columns(["image", "shape"])
        out = out.append_column("tag_labels", pa.ListArray.from_arrays(offsets, pa.array(labels, pa.int64())))
        out = out.append_column("tag_scores", pa.ListArray.from_arrays(offsets, pa.array(values, pa.float32())))
        if self.all_scores:
            width = self.features.shape[0]
            score_counts = np.zeros(rows, dtype=np.int64)
            score_counts[good] = width
            score_offsets = pa.array(np.concatenate([[0], np.cumsum(score_counts)]).astype(np.int32))
            flat = every.reshape(-1) if every is not None else np.zeros(0, dtype=np.float32)
            out = out.append_column("scores", pa.ListArray.from_arrays(score_offsets, pa.array(flat, pa.float32())))
        return out
