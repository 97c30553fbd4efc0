"""Where a training run reports: `train.log`, `metrics.jsonl`, TensorBoard; and on stderr, through the shared
reporter (:mod:`ramtag.engine.reporter`), its progress bar or plain step lines.

Only rank 0 reports; on other ranks every method is a no-op.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ramtag.atomic import write_text
from ramtag.engine.reporter import Reporter
from ramtag.errors import UsageError
from ramtag.messages import listed

if TYPE_CHECKING:
    import torch

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


class TrainReporter:
    """Training's records (train.log, metrics.jsonl, TensorBoard) and, through the shared
    :class:`~ramtag.engine.reporter.Reporter`, its progress bar and messages on stderr."""

    def __init__(self, output: Path, enabled: bool, progress: bool | None, tensorboard: bool, resume: bool):
        self.enabled = enabled
        self._log = self._metrics = self._task = self._writer = None
        self._display: Reporter | None = None
        if not enabled:
            return
        self._display = Reporter(bar=progress, fields=("{task.fields[status]}",), elapsed=True)
        output.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"
        self._log = open(output / LOG_FILE, mode, encoding="utf-8")  # closed in close()
        self._metrics = open(output / METRICS_FILE, mode, encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self._writer = SummaryWriter(str(output / "tensorboard"))

    @property
    def has_progress(self) -> bool:
        return self._display is not None and self._display.has_bar

    def start(self, total_steps: int, done: int) -> None:
        if self._display is not None:
            self._task = self._display.task("[bold]train", total_steps, completed=done, status="")

    def info(self, message: str, echo: bool = True) -> None:
        """A line in train.log, and on stderr unless `echo` is false."""
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"{stamp} {message}\n")
        self._log.flush()
        if echo:
            self._display.log(f"ramtag: {message}")

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(_json_value(record), sort_keys=False) + "\n")
        self._metrics.flush()
        if self._writer is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    prefix = "val" if record.get("kind") == "val" else "train"
                    self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def advance(self, step: int, status: str) -> None:
        if self._display is not None:
            self._display.update(self._task, completed=step, status=status)

    def close(self) -> None:
        if not self.enabled:
            return
        self._display.close()
        if self._writer is not None:
            self._writer.close()
        for handle in (self._log, self._metrics):
            if handle is not None:
                handle.close()


class StepLog:
    """Step records averaged over windows of `log_every` steps into metric lines (and log lines when no
    progress bar shows them)."""

    def __init__(self, reporter: TrainReporter, log_every: int, last_step: int):
        self.reporter, self.log_every, self.last_step = reporter, log_every, last_step
        self.window: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def add(self, record: dict[str, Any]) -> None:
        self.window.append(record)
        step = record["step"]
        if step % self.log_every == 0 or step == self.last_step:
            line = window_record(self.window, time.perf_counter() - self.started)
            self.reporter.metrics(line)
            if not self.reporter.has_progress:
                self.reporter.info(
                    f"step {step}/{self.last_step} epoch {line['epoch']:.2f} loss {line.get('loss', float('nan')):.4f} "
                    f"lr x{line['lr_factor']:.3f} grad {line['grad_norm']:.3g}"
                )
            self.window, self.started = [], time.perf_counter()
        self.reporter.advance(step, f"loss {record.get('loss', float('nan')):.4f}")


def step_record(
    step: int,
    epochs: float,
    parts: list[dict[str, float]],
    factor: float,
    grad_norm: float,
    optimizers: list[torch.optim.Optimizer],
    model: torch.nn.Module,
) -> dict[str, Any]:
    """One optimizer step's record: the mean of its micro-batches' losses, its rates, gradient norm and
    temperatures."""
    record: dict[str, Any] = {"kind": "train", "step": step, "epoch": epochs}
    if parts:
        for key in ("loss", "loss_global", "loss_local"):
            record[key] = sum(p[key] for p in parts) / len(parts)
        record["images"] = sum(p["images"] for p in parts)
    record["lr_factor"] = factor
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            record[f"lr_{group['name']}"] = group["lr"]
    record["grad_norm"] = grad_norm
    record["temperature"] = float(model.temperature.detach())
    record["temperature_loc"] = float(model.temperature_loc.detach())
    return record


def dropped_summary(dropped: Counter[str], unseen: Sequence[str], listing: Path) -> str:
    """The log line about label occurrences dropped as outside the seen label space."""
    common = listed([f"{label!r} ({count})" for label, count in dropped.most_common()], 20, quote=False)
    held_out = sum(count for label, count in dropped.items() if label in set(unseen))
    why = f", {held_out} of them --unseen labels" if held_out else ""
    return (
        f"{sum(dropped.values())} label occurrence(s) outside the seen label space dropped{why}; "
        f"{len(dropped)} distinct: {common} (all in {listing})"
    )


def window_record(window: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The metric line of a window of step records: the last step's values, the mean loss over the window (the
    last step's as `loss_last`) and the images per second."""
    last = dict(window[-1])
    losses = [r["loss"] for r in window if "loss" in r]
    if losses:
        last["loss_last"] = last.get("loss")
        last["loss"] = sum(losses) / len(losses)
    images = sum(r.get("images", 0) for r in window)
    last["images_per_s"] = images / seconds if seconds > 0 else None
    last.pop("images", None)
    return last


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step (written after the saved state, by the interrupted run)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    write_text(path, "".join(f"{line}\n" for line in kept))
