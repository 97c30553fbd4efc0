"""Validation during training: the metrics of the model on `--val`, and which of them picks `best.safetensors`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ramtag.engine.runtime import Runtime
from ramtag.engine.train.config import BEST_METRIC_DEFAULT, TrainConfig
from ramtag.engine.train.ema import TrainableEma
from ramtag.errors import UsageError
from ramtag.model.ram import RamModel


class Validation:
    """Validates on `--val` and keeps the best value of the `--best-metric` and its step."""

    def __init__(self, config: TrainConfig, seen: tuple[str, ...], unseen: tuple[str, ...]):
        self.config, self.seen, self.unseen = config, seen, unseen
        self.best: dict[str, Any] = {"metric": best_metric_name(config, unseen), "value": None, "step": None}
        self.last: dict[str, float] | None = None
        """The metrics of the last validation."""

    def metrics(
        self, model: RamModel, ema: TrainableEma | None, device: torch.device, log: Callable[[str], None]
    ) -> tuple[dict[str, float], dict[str, float] | None]:
        """The metrics of the exported weights (the EMA's when EMA is on) and of the live ones (None when EMA is
        on without `--val-live`). Warnings are logged once."""
        model.eval()
        try:
            live = self._evaluate(model, device, log) if (ema is None or self.config.val_live) else None
            if ema is None:
                return live, live
            with ema.applied_to(model):
                exported = self._evaluate(model, device, log if live is None else (lambda _: None))
            return exported, live
        finally:
            model.train()

    def improved(self, metrics: dict[str, float], step: int) -> bool:
        """Keep `metrics` as the last validation's; True when they beat the best so far (now the best)."""
        self.last = metrics
        name = self.best["metric"]
        if name not in metrics:
            raise UsageError(f"--best-metric {name}: validation reported {', '.join(sorted(metrics))}")
        value = metrics[name]
        if self.best["value"] is None or value > self.best["value"]:
            self.best = {"metric": name, "value": value, "step": step}
            return True
        return False

    def _evaluate(self, model: RamModel, device: torch.device, log: Callable[[str], None]) -> dict[str, float] | None:
        return validation_metrics(model, device, self.config, self.seen, self.unseen, log)


def best_metric_name(config: TrainConfig, unseen: tuple[str, ...]) -> str | None:
    """The metric `--best-metric` names, checked against the protocols validation reports (None: no `--val`)."""
    if not config.val:
        return None
    metric = config.best_metric
    if metric == BEST_METRIC_DEFAULT:
        return "gzsl/mAP" if unseen else "multilabel/mAP"
    protocol = metric.split("/", 1)[0]
    wanted = ("zsl", "gzsl") if unseen else ("multilabel",)
    if protocol not in wanted:
        raise UsageError(
            f"--best-metric {metric}: validation reports {' and '.join(wanted)} "
            f"{'with' if unseen else 'without'} --unseen"
        )
    return metric


def validation_metrics(
    model: RamModel,
    device: torch.device,
    config: TrainConfig,
    seen: tuple[str, ...],
    unseen: tuple[str, ...],
    log: Callable[[str], None],
) -> dict[str, float] | None:
    """`{protocol/metric: value}` of `model` as it is on `config.val` (None when nothing could be evaluated)."""
    from ramtag.engine.eval.model import evaluate_model
    from ramtag.engine.eval.types import EvalSettings

    settings = EvalSettings(
        root=config.root,
        prefix_map=tuple(config.map_prefix),
        labels=seen + unseen,
        unseen=unseen or None,
        batch_size=config.val_batch_size,
        workers=config.num_workers,
        ks=(3, 5),
    )
    runtime = Runtime(model=model, device=device, fingerprint="training")
    result = evaluate_model(runtime, config.val, settings, log=log)
    if result is None:
        return None
    metrics: dict[str, float] = {}
    for name, protocol in result.protocols.items():
        arm = protocol.arms["model"]
        metrics.update({f"{name}/{key}": float(value) for key, value in arm.metrics.summary().items()})
        metrics.update({f"{name}/{key}": value for key, value in arm.extra.items() if value is not None})
    return metrics
