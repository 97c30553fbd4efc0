"""Learning-rate schedules as pure functions of the optimizer step: nothing to save but the step itself.

`reference`: the reference implementation's cosine over a 60-epoch period, stepped once per epoch (epochs
counted from 1), with linear warm-up from 1% of the base rate over 3 epochs and a floor of 0.2%. Over its
6-epoch runs that is about 0.34, 0.67, then 0.99 to 0.98 of the base rate: warm-up, then nearly constant.

`cosine`: a plain per-step cosine over the actual run (linear warm-up, then down to the same floor).

`constant`: the base rate throughout (warm-up still applies when asked for).

`LearningRates` applies a schedule with torch's own LambdaLR, one per optimizer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when rates are applied: the CLI reads SCHEDULES without it
    import torch

SCHEDULES = ("reference", "cosine", "constant")

WARMUP_START = 0.01
"""Warm-up starts at this fraction of the base rate (the reference's warmup_lr_init = 0.01 · base)."""
FLOOR = 0.002
"""The cosine ends at this fraction of the base rate (the reference's lr_min = 0.002 · base)."""


@dataclass(frozen=True)
class Schedule:
    kind: str
    steps_per_epoch: int
    total_steps: int
    warmup_epochs: float
    period_epochs: int = 60
    """Cosine period of the `reference` schedule, in epochs."""

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.kind!r}")
        if self.steps_per_epoch < 1 or self.total_steps < 1:
            raise ValueError("a schedule needs at least one step")
        if self.warmup_epochs < 0 or self.period_epochs < 1:
            raise ValueError("warm-up cannot be negative and the period must be at least one epoch")

    def factor(self, step: int) -> float:
        """Multiplier of every base rate for optimizer step `step` (0-based)."""
        if self.kind == "reference":
            return self._reference(step // self.steps_per_epoch + 1)
        warmup_steps = self.warmup_epochs * self.steps_per_epoch
        if step < warmup_steps:
            return WARMUP_START + (1.0 - WARMUP_START) * step / warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - warmup_steps, 1.0)
        progress = min((step - warmup_steps) / span, 1.0)
        return FLOOR + 0.5 * (1.0 - FLOOR) * (1.0 + math.cos(math.pi * progress))

    def _reference(self, epoch: int) -> float:
        # As timm's CosineLRScheduler with warmup_prefix=False and cycle_limit=1: the cosine is read at the
        # epoch itself, not at epoch - warm-up, and stays at the floor after one period.
        if epoch < self.warmup_epochs:
            return WARMUP_START + epoch * (1.0 - WARMUP_START) / self.warmup_epochs
        if epoch >= self.period_epochs:
            return FLOOR
        return FLOOR + 0.5 * (1.0 - FLOOR) * (1.0 + math.cos(math.pi * epoch / self.period_epochs))


def default_warmup_epochs(kind: str, epochs: float) -> float:
    """Reference: 3 epochs. Plain cosine: 5% of the run. Constant: none."""
    if kind == "reference":
        return 3.0
    if kind == "cosine":
        return 0.05 * epochs
    return 0.0


class LearningRates:
    """torch's LambdaLR on each optimizer with `Schedule.factor` as the multiplier of every group's base rate
    (its `lr` when the optimizer was built): scheduler step k is optimizer step k."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], schedule: Schedule):
        from torch.optim.lr_scheduler import LambdaLR

        self.schedulers = [LambdaLR(optimizer, schedule.factor) for optimizer in optimizers]

    def advance(self) -> None:
        """The rates of the next optimizer step."""
        for scheduler in self.schedulers:
            _step_quietly(scheduler)

    def go_to(self, step: int) -> None:
        """The rates of optimizer step `step` (a resumed run: the schedule is a function of the step alone)."""
        for scheduler in self.schedulers:
            scheduler.last_epoch = step - 1
            _step_quietly(scheduler)


def _step_quietly(scheduler) -> None:  # a torch LRScheduler
    # torch warns when a scheduler steps before its optimizer has: here steps count the optimizer steps a run
    # attempts, also those the fp16 GradScaler skips or that had no usable image, so the warning does not apply.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Seems like `optimizer\.step\(\)` has been overridden")
        scheduler.step()
