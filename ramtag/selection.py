"""Pick each image's tags from its label scores: top k, then thresholds (pure torch/numpy).

A label becomes a tag when its score is among the image's ``top_k`` highest (0: no limit) and
at least its threshold: the per-label threshold when given, else the global one. An image may
therefore get no tags. Tags of equal score are listed by label order; when a tie straddles the
k-th place, which of the tied labels is kept is up to ``torch.topk``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Selection:
    """Tags of a batch, flattened: row ``i`` owns ``counts[i]`` consecutive entries.

    ``labels`` are vocabulary indices; ``scores`` float32; within a row, by score descending.
    """

    counts: np.ndarray
    labels: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.counts)

    def row(self, index: int) -> list[tuple[int, float]]:
        """Tags of one row as (label index, score) pairs."""
        start = int(self.counts[:index].sum())
        stop = start + int(self.counts[index])
        return [(int(label), float(score)) for label, score in zip(self.labels[start:stop], self.scores[start:stop])]


def select_tags(
    scores: Any,
    *,
    top_k: int = 5,
    threshold: float | None = None,
    per_label: Any | None = None,
) -> Selection:
    """Select tags from ``scores`` ``[B, C]`` (torch tensor on any device, or array-like).

    Args:
        top_k: keep at most this many per image; 0 keeps every label that passes its threshold.
        threshold: global minimum score (inclusive); None for no minimum.
        per_label: thresholds ``[C]`` that replace the global one (``inf`` never tags the label).
    """
    if top_k < 0:
        raise ValueError("top_k must be >= 0")
    values = torch.as_tensor(scores).detach()
    if values.ndim != 2:
        raise ValueError(f"scores must be [batch, labels], got shape {tuple(values.shape)}")
    values = values.float()
    n_rows, n_labels = values.shape
    k = n_labels if top_k == 0 else min(top_k, n_labels)
    if n_rows == 0 or k == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Selection(np.zeros(n_rows, dtype=np.int64), empty, np.zeros(0, dtype=np.float32))
    if k < n_labels:
        top_values, top_labels = values.topk(k, dim=1)
        # topk promises no order among ties: order by label index, then stably by score
        top_labels, by_label = top_labels.sort(dim=1)
        top_values, by_score = top_values.gather(1, by_label).sort(dim=1, descending=True, stable=True)
        top_labels = top_labels.gather(1, by_score)
    else:
        top_values, top_labels = values.sort(dim=1, descending=True, stable=True)
    if per_label is not None:
        limits = torch.as_tensor(per_label, dtype=torch.float32, device=values.device)
        if limits.shape != (n_labels,):
            raise ValueError(f"per_label thresholds have shape {tuple(limits.shape)}, expected ({n_labels},)")
        keep = top_values >= limits[top_labels]
    elif threshold is not None:
        keep = top_values >= threshold
    else:
        keep = torch.ones_like(top_values, dtype=torch.bool)
    counts = keep.sum(dim=1)
    return Selection(
        counts=counts.cpu().numpy().astype(np.int64),
        labels=top_labels[keep].cpu().numpy().astype(np.int64),
        scores=top_values[keep].cpu().numpy().astype(np.float32),
    )
