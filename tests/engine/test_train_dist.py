"""Distributed training on CPU: one step of 2 processes x batch 1 equals one step of 1 process x batch 2.

Everything that looks across the batch must see the global batch for this to hold: the MMC softmax (logits
gathered with gradients), the teacher's minimum, and the adapters' batch-norm statistics (all-reduced on gloo).
Gradients are summed over ranks, not averaged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ramtag.engine.train.config import TrainConfig
from ramtag.engine.train.recipe import train
from ramtag.engine.train.schedule import Schedule
from tests.train_fixtures import write_init_checkpoint, write_reference_json

REPO = Path(__file__).resolve().parents[2]


def _first_loss(output: Path) -> float:
    return json.loads((output / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.slow
def test_one_step_on_two_processes_equals_one_step_on_one(tmp_path):
    torch.set_num_threads(1)
    init = write_init_checkpoint(tmp_path / "init.safetensors")
    data = write_reference_json(tmp_path, "train.json", 6, seed=3)
    options = dict(train=[str(data)], root=str(tmp_path), init=str(init), batch_size=2, max_steps=1, ema_decay=0.0,
                   num_workers=0, log_every=1, device="cpu", progress=False)
    single = tmp_path / "single"
    train(TrainConfig(output=str(single), **options))

    double = tmp_path / "double"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    argv = [*torchrun, "-m", "ramtag", "train",
            str(data), "--root", str(tmp_path), "--init", str(init), "--batch-size", "2", "--max-steps", "1",
            "--ema-decay", "0", "--workers", "0", "--log-every", "1", "--device", "cpu", "--no-progress",
            "-o", str(double)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in (double / "train.log").read_text()

    assert _first_loss(double) == pytest.approx(_first_loss(single), rel=1e-5)
    start = load_file(init)
    one, two = load_file(single / "checkpoint.safetensors"), load_file(double / "checkpoint.safetensors")
    factor = Schedule("reference", 1, 1, 3).factor(0)
    adam_rates = {"temperature": 5e-5 * factor, "temperature_loc": 5e-5 * factor}
    for name in one:
        if name.startswith("clip."):
            assert torch.equal(one[name], two[name]), name
            continue
        step_one, step_two = (one[name] - start[name]).double(), (two[name] - start[name]).double()
        if name.startswith(("text.prompts.", "vision.adapter_tokens.")) or "running_" in name:
            # SGD updates and batch-norm statistics are linear in what was reduced: equal up to float rounding.
            assert (step_one - step_two).norm() <= 1e-4 * step_one.norm(), name
        elif name.endswith("num_batches_tracked"):
            assert torch.equal(one[name], two[name])
        else:
            # AdamW's first step is lr * g / (|g| + eps): only gradients within float noise of zero may flip sign.
            rate = adam_rates.get(name, 5e-6 * factor)
            flipped = ((step_one - step_two).abs() > 1e-3 * rate).double().mean()
            assert flipped <= 0.01, (name, float(flipped))
