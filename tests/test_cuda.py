"""Every CUDA path, on a CUDA device: skipped without one (CI is CPU-only); benchmarks/gpu_check.sh runs them.

Each test compares the CUDA path with the CPU/fp32 one it stands in for and, where ``RAMTAG_CUDA_REPORT`` names a
JSON file, records the measured difference there so the device check reports figures, not just a pass.

The bounds: fp32 on CUDA against fp32 on the CPU differs by kernel order and TF32 convolutions (the patch
embedding), ~1e-3 relative at most on a tiny model; bf16 autocast keeps 8 bits of mantissa (relative error
2^-8 = 3.9e-3 per rounding) through a handful of layers, so scores (probabilities) within 0.05 and the same top
label on nearly every image; KCOT itself always solves in fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import build_tiny_checkpoint
from tests.io_fixtures import write_image

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

REPO = Path(__file__).resolve().parents[1]
LABELS = ["cat", "dog", "red car", "tree", "person", "blue sky"]


def record(name: str, **figures) -> None:
    target = os.environ.get("RAMTAG_CUDA_REPORT")
    if not target:
        return
    path = Path(target)
    report = json.loads(path.read_text()) if path.exists() else {}
    report[name] = figures
    path.write_text(json.dumps(report, indent=2))


def ramtag(*args, env_extra=None, timeout=300, launcher=None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable, "-m"]), "ramtag", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-images")
    folder = root / "photos"
    folder.mkdir()
    for seed in range(24):
        write_image(folder / f"img{seed:02d}.jpg", seed)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(LABELS) + "\n")
    checkpoint = build_tiny_checkpoint(root / "tiny.safetensors")
    return folder, vocab, checkpoint


def scores_of(path: Path) -> tuple[list[str], np.ndarray]:
    rows = sorted(pq.read_table(path).to_pylist(), key=lambda row: row["key"])
    return [row["key"] for row in rows], np.array([row["scores"] for row in rows])


def tag(images, out: Path, *extra) -> np.ndarray:
    folder, vocab, checkpoint = images
    result = ramtag("tag", folder, "--labels", vocab, "-c", checkpoint, "-o", out, "--all-scores", "-q", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    keys, scores = scores_of(out)
    assert len(keys) == 24
    return scores


def test_fp32_on_cuda_matches_the_cpu(images, tmp_path):
    cpu = tag(images, tmp_path / "cpu.parquet", "--device", "cpu", "--precision", "fp32")
    cuda = tag(images, tmp_path / "cuda.parquet", "--device", "cuda", "--precision", "fp32")
    difference = float(np.abs(cpu - cuda).max())
    record("fp32_cuda_vs_cpu", max_abs_score_difference=difference)
    assert difference < 1e-3


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_autocast_scores_stay_close_to_fp32(images, tmp_path, precision):
    fp32 = tag(images, tmp_path / "fp32.parquet", "--device", "cuda", "--precision", "fp32")
    half = tag(images, tmp_path / f"{precision}.parquet", "--device", "cuda", "--precision", precision)
    difference = float(np.abs(fp32 - half).max())
    same_top = float((fp32.argmax(1) == half.argmax(1)).mean())
    record(f"{precision}_vs_fp32", max_abs_score_difference=difference, same_top_label=same_top)
    assert difference < 0.05
    assert same_top >= 0.9


def test_compiled_tag_scores_as_the_eager_one_on_cuda(images, tmp_path):
    """--compile under the GPU's default precision (bf16 autocast): compiled and eager are two bf16 roundings of
    the same fp32 computation, so they keep to the autocast bound against fp32. 24 images in batches of at most 16
    put at least one padded batch through the compiled graph. A compiler missing on the device fails here, by name."""
    folder, vocab, checkpoint = images
    options = ["--labels", vocab, "-c", checkpoint, "--all-scores", "-b", 16, "--device", "cuda", "--precision", "auto"]
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        out = tmp_path / f"{name}.parquet"
        result = ramtag("tag", folder, "-o", out, *options, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "torch.compile failed" not in result.stderr, result.stderr[-3000:]
        runs[name] = scores_of(out)[1]
    difference = float(np.abs(runs["eager"] - runs["compiled"]).max())
    same_top = float((runs["eager"].argmax(1) == runs["compiled"].argmax(1)).mean())
    record("compiled_vs_eager_auto_precision", max_abs_score_difference=difference, same_top_label=same_top)
    assert difference < 0.05
    assert same_top >= 0.9


def test_gpu_decoding_tags_like_cpu_decoding(images, tmp_path):
    cpu = tag(images, tmp_path / "cpu-decode.parquet", "--device", "cuda", "--precision", "fp32", "--decode", "cpu")
    gpu = tag(images, tmp_path / "gpu-decode.parquet", "--device", "cuda", "--precision", "fp32", "--decode", "gpu")
    difference = float(np.abs(cpu - gpu).max())
    record("gpu_vs_cpu_decoding", max_abs_score_difference=difference)
    assert difference < 1e-2  # one grey level of input on a random tiny model


def test_torchrun_with_nccl_on_one_gpu_matches_one_process(images, tmp_path):
    single = tag(images, tmp_path / "single.parquet", "--device", "cuda", "--precision", "fp32")
    folder, vocab, checkpoint = images
    out = tmp_path / "torchrun.parquet"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m"]
    result = ramtag(
        "tag", folder, "--labels", vocab, "-c", checkpoint, "-o", out, "--all-scores", "-q",
        "--device", "cuda", "--precision", "fp32", launcher=launcher,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    _, scores = scores_of(out)
    difference = float(np.abs(single - scores).max())
    record("torchrun_nccl_vs_single", max_abs_score_difference=difference)
    assert difference < 1e-5


def test_training_with_amp_and_syncbatchnorm_on_cuda(tmp_path):
    from tests.train_fixtures import write_init_checkpoint, write_reference_json

    init = write_init_checkpoint(tmp_path / "init.safetensors")
    data = write_reference_json(tmp_path, "train.json", 16, seed=3)
    common = [
        data, "--root", tmp_path, "--init", init, "--batch-size", "4", "--max-steps", "3", "--workers", "0",
        "--log-every", "1", "--device", "cuda", "--no-progress",
    ]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m"]
    losses = {}
    for name, precision, how in [("amp", "bf16", None), ("amp-sync", "bf16", launcher), ("fp32", "fp32", None)]:
        out = tmp_path / name
        result = ramtag("train", *common, "--precision", precision, "-o", out, launcher=how)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [line["loss"] for line in lines if "loss" in line]
        assert losses[name] and all(np.isfinite(losses[name]))
        if how is not None:  # SyncBatchNorm is what a distributed run puts in the adapters
            assert "batch norm(s) synchronised" in (out / "train.log").read_text()
    record("train_amp", losses=losses, peak_memory_bytes=torch.cuda.max_memory_allocated())
    assert abs(losses["amp"][0] - losses["fp32"][0]) <= 0.05 * abs(losses["fp32"][0]) + 1e-3


def test_explain_maps_on_cuda(images, tmp_path):
    folder, vocab, checkpoint = images
    out = tmp_path / "maps"
    result = ramtag("explain", folder / "img00.jpg", "--labels", vocab, "-c", checkpoint, "-o", out, "--device", "cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(out.glob("*.png"))


def test_selfcheck_on_cuda():
    result = ramtag("selfcheck", "--device", "cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cuda" in result.stdout and "self-check passed" in result.stdout


def test_runtime_keeps_kcot_in_fp32_under_autocast(tmp_path):
    from ramtag.engine.runtime import load_runtime

    checkpoint = build_tiny_checkpoint(tmp_path / "tiny.safetensors")
    runtime = load_runtime(checkpoint, device="cuda")
    features = runtime.encode_labels(LABELS)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fp32 = runtime.score(images, features, None)
    bf16 = runtime.score(images, features, torch.bfloat16)
    assert bf16.plan.dtype == torch.float32  # KCOT solves half-precision inputs in fp32
    sums = bf16.scores.float().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-3)
    record("runtime_bf16_vs_fp32", max_abs_score_difference=float((fp32.scores - bf16.scores.float()).abs().max()))
