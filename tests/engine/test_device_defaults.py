"""Defaults that fit the device: --precision auto, the batch size per device, and out-of-memory as a usage error."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from ramtag.engine import runtime as runtime_module
from ramtag.engine.runtime import DEFAULT_BATCH_SIZES, autocast_dtype, default_batch_size
from ramtag.errors import EXIT_USAGE, UsageError
from tests.io_fixtures import run_cli, write_image


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for seed in range(6):
        write_image(root / f"img{seed}.png", seed)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\ntree\n")
    return root, vocab


def test_auto_precision_is_fp32_on_the_cpu_and_half_precision_asked_for_there_is_refused():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp32", cpu) is None
    for precision in ("bf16", "fp16"):
        with pytest.raises(UsageError, match="needs CUDA"):
            autocast_dtype(precision, cpu)


def test_the_default_batch_is_larger_on_cuda():
    assert default_batch_size(torch.device("cpu")) == DEFAULT_BATCH_SIZES["cpu"]
    assert default_batch_size(torch.device("cuda", 0)) == DEFAULT_BATCH_SIZES["cuda"] > DEFAULT_BATCH_SIZES["cpu"]


def test_tag_runs_with_the_device_defaults(folder, tiny_checkpoint, tmp_path):
    root, vocab = folder
    out = tmp_path / "tags.parquet"
    assert run_cli("tag", root, "--labels", vocab, "-c", tiny_checkpoint, "-o", out, "--workers", 0, "-q") == 0
    assert pq.read_table(out).num_rows == 6


def test_out_of_device_memory_names_the_option_to_change(folder, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    root, vocab = folder
    calls = []

    def out_of_memory(self, images, *args, **kwargs):
        calls.append(len(images))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runtime_module.RamModel, "__call__", out_of_memory)
    code = run_cli(
        "tag", root, "--labels", vocab, "-c", tiny_checkpoint, "-o", tmp_path / "t.parquet", "--workers", 0, "-b", 4
    )
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and calls == [4]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("ramtag: error: cpu ran out of memory at 4 images per batch")
    assert "--batch-size" in lines[-1] and "-b 2" in lines[-1] and "Traceback" not in err
