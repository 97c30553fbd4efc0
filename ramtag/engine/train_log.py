"""Where a training run reports: `train.log`, `metrics.jsonl`, a rich progress bar on stderr, TensorBoard.

Only rank 0 reports; on other ranks every method is a no-op.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from ramtag.errors import UsageError


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


class TrainReporter:
    def __init__(self, output: Path, enabled: bool, progress: bool | None, tensorboard: bool, resume: bool):
        self.enabled = enabled
        self._log = self._metrics = self._progress = self._task = self._writer = None
        self._console = None
        if not enabled:
            return
        from rich.console import Console

        self._console = Console(stderr=True, highlight=False)
        show_progress = sys.stderr.isatty() if progress is None else progress
        output.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"
        self._log = open(output / "train.log", mode, encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._metrics = open(output / "metrics.jsonl", mode, encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self._writer = SummaryWriter(str(output / "tensorboard"))
        if show_progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self._console, transient=False,
            )

    @property
    def has_progress(self) -> bool:
        return self._progress is not None

    def start(self, total_steps: int, done: int) -> None:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=done, status="")

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"{stamp} {message}\n")
        self._log.flush()
        self._console.print(message, markup=False)

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
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, status=status)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        for handle in (self._log, self._metrics):
            if handle is not None:
                handle.close()
