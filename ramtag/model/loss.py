"""The multi-matching contrastive (MMC) loss: one softmax over every image-label pair of the batch."""

from __future__ import annotations

import torch


def mmc_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(1/Σy) Σ y_bc (z_bc - log Σ_{b',c'} exp z_b'c'), with the max subtracted for stability.

    `logits` and `targets` are [B, C] (or any shape: they are flattened). In distributed training pass the
    logits and targets gathered from every rank, so the softmax spans the global batch.
    """
    flat = logits.reshape(-1)
    # Half precision is summed in float32; float64 stays float64 (gradient checks, exact comparisons).
    flat = flat if flat.dtype == torch.float64 else flat.float()
    positive = targets.reshape(-1).to(flat.dtype)
    log_prob = flat - torch.logsumexp(flat, dim=0)
    count = positive.sum()
    count = torch.where(count < 1e-6, torch.ones_like(count), count)
    return -(positive * log_prob).sum() / count
