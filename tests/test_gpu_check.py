"""benchmarks/gpu_check.sh, the prepared device check, in its CPU dry run: so it cannot rot between GPU loans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_device_check_runs_every_step_on_a_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu"
    assert set(summary["steps"]) >= {"environment", "cuda_tests", "tag_throughput", "tag_compile", "train_memory"}
    assert all(step["exit"] == 0 for step in summary["steps"].values()), summary
    throughput = json.loads((out / "tag_throughput.cpu.json").read_text())
    models = {row["model"] for row in throughput["results"]}
    assert models == {"vitb_adapters", "vitb_training_free"}
    assert all(row["tag_images_per_second"] > 0 and "wall_seconds" in row["cli"] for row in throughput["results"])
    assert all(row["tag_decode"] == "cpu" for row in throughput["results"])
    compiled = json.loads((out / "tag_throughput.compile.cpu.json").read_text())["results"]
    # on a CPU the tag arm decodes in the workers, and the other arm runs the batched decoder (--decode gpu)
    assert compiled[0]["tag_decode"] == "cpu" and compiled[0]["tag_gpu_decode_images_per_second"] > 0
    assert [row["model"] for row in compiled] == ["vitb_adapters"]
    assert compiled[0]["compile_failure"] is None and compiled[0]["compile_seconds"] > 0
    assert compiled[0]["forward_compiled_images_per_second"] > 0 and compiled[0]["tag_compiled_images_per_second"] > 0
    memory = json.loads((out / "train_memory.cpu.json").read_text())
    assert memory["results"]
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back


def test_a_step_that_would_overrun_the_budget_is_not_started(tmp_path):
    """The step limits add up to more than the device's minutes; the whole check's budget cuts them."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "RAMTAG_GPU_CHECK_BUDGET_S": "1"}
    run = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps and all(step == {"exit": 125, "seconds": 0} for step in steps.values())
    assert "not run" in (out / "gpu_check.log").read_text()
