"""An exponential moving average of RAM's trainable tensors, used for evaluation and export.

Decay at update t (0-based) is min(decay, (1 + t) / (10 + t)): early updates move the average quickly so a
short run is not frozen near its initial weights. Floating tensors (parameters and batch-norm running
statistics) are averaged; integer buffers (batch counters) are copied.

Unlike the reference, which re-creates its EMA from the live weights at the start of every epoch, this one
runs through the whole training.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class TrainableEma:
    def __init__(self, state: dict[str, torch.Tensor], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {name: tensor.detach().clone() for name, tensor in state.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor]) -> None:
        decay = self.current_decay()
        for name, average in self.shadow.items():
            value = state[name].detach()
            if average.is_floating_point():
                average.mul_(decay).add_(value.to(average.dtype), alpha=1.0 - decay)
            else:
                average.copy_(value)
        self.updates += 1

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[None]:
        """Swap the averaged tensors into `model` for the duration of the block, then restore the live ones."""
        live = {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if name in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(live, strict=False)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)
