"""`ramtag tag --decode gpu`: the batched JPEG decoder in the tag loop, against the CPU decoder it stands in for.

On a machine without CUDA the same code path runs with ``--device cpu`` (torchvision's decoder takes CPU tensors),
so CI checks the whole path: workers keep JPEGs encoded, the main process decodes them in batches and joins them
with the CPU-decoded rows, refused JPEGs fall back to the CPU decoder. The ``cuda`` cases run on a lent GPU
(benchmarks/gpu_check.sh).

How close the scores must be: the device decoder's images differ from PIL's by at most one 8-bit level, on about
one pixel in eight (tests/data/test_device_decode.py; 0.13 here). Each test measures, on the same model and images,
what a one-level dither of *every* pixel (random signs, seeded) does to the scores, and asserts the decoder's
difference stays within that: a perturbation no larger in any pixel must not move a score further. Measured on
CPU: the decoder moves a score by at most 0.0078, the dither by 0.039.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ramtag.data.device_batch import join_device_images
from ramtag.data.device_decode import DeviceJpegs
from ramtag.data.images import decode_image
from ramtag.data.records import Record, collate_records, decode
from ramtag.engine.device_feed import HostScores, decodes_on_device
from ramtag.engine.runtime import load_runtime
from ramtag.errors import EXIT_USAGE
from tests.data.test_device_decode import jpeg
from tests.io_fixtures import run_cli

LABELS = ["cat", "dog", "red car", "tree"]
MAX_PIXELS = 100_000
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]


def photo(seed: int, size=(96, 72), mode="RGB") -> Image.Image:
    """A gradient with texture, as photos are: flat noise would make every resize filter look alike."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    return Image.fromarray((ramp + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)).convert(mode)


DEVICE_JPEGS = ["rgb0.jpg", "rgb1.jpg", "rgb2.jpg", "rgb3.jpg", "rgb4.jpg", "rgb5.jpg", "grey.jpg", "rotated.jpg"]
"""The inputs the device decoder takes; the others are decoded (or refused) by the CPU path in both runs."""
ERRORS = {"big.jpg": "too many pixels (400 x 300 > 100000)", "notes.jpg": "not an image", "truncated.jpg": "truncated"}


@pytest.fixture()
def mixed(tmp_path):
    """JPEGs of several sizes, greyscale, EXIF-rotated and CMYK, a PNG, a truncated JPEG, a text file named .jpg
    and a JPEG over the pixel cap."""
    root = tmp_path / "photos"
    root.mkdir()
    for seed in range(6):
        (root / f"rgb{seed}.jpg").write_bytes(jpeg(photo(seed, (96 + 8 * seed, 72))))
    (root / "grey.jpg").write_bytes(jpeg(photo(10, mode="L")))
    (root / "rotated.jpg").write_bytes(jpeg(photo(11, (120, 64)), orientation=6))
    (root / "cmyk.jpg").write_bytes(jpeg(photo(12, mode="CMYK")))
    photo(13).save(root / "plain.png")
    whole = jpeg(photo(14))
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "notes.jpg").write_text("not an image")
    (root / "big.jpg").write_bytes(jpeg(photo(15, (400, 300))))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(LABELS) + "\n")
    return root, vocab


def rows_of(path) -> dict[str, dict]:
    return {row["key"]: row for row in pq.read_table(path).to_pylist()}


def dither_bound(runtime, paths) -> float:
    """The largest score change a random one-level dither of every pixel causes on these images (8 seeds)."""
    features = runtime.encode_labels(LABELS)
    images = torch.stack([runtime.transform()(decode_image(path)) for path in paths])
    level = 1 / 255 / runtime.config.preprocessing.std[0]
    base = runtime.score(images, features).scores.float().cpu()
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(8):
        noise = (torch.randint(0, 2, images.shape, generator=generator) * 2 - 1) * level
        moved = runtime.score(images + noise, features).scores.float().cpu()
        worst = max(worst, float((moved - base).abs().max()))
    return worst


def tag(root, vocab, checkpoint, out, *extra) -> dict[str, dict]:
    code = run_cli(
        "tag",
        root,
        "-l",
        vocab,
        "-c",
        checkpoint,
        "-o",
        out,
        "--all-scores",
        "-q",
        "-b",
        4,
        "--max-pixels",
        MAX_PIXELS,
        "--precision",
        "fp32",
        *extra,
    )
    assert code == 3  # the three bad inputs
    return rows_of(out)


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_decoding_keeps_every_row_and_error_and_scores_within_a_level(mixed, tiny_checkpoint, tmp_path, device):
    root, vocab = mixed
    cpu = tag(root, vocab, tiny_checkpoint, tmp_path / "cpu.parquet", "--device", device, "--decode", "cpu", "-j", 0)
    # one worker: the decoder's transform and the encoded JPEGs cross the process boundary
    gpu = tag(root, vocab, tiny_checkpoint, tmp_path / "gpu.parquet", "--device", device, "--decode", "gpu", "-j", 1)
    assert sorted(gpu) == sorted(cpu) == sorted([*DEVICE_JPEGS, "cmyk.jpg", "plain.png", *ERRORS])
    assert {key: row["error"] for key, row in gpu.items() if row["error"]} == ERRORS
    assert {key: row["error"] for key, row in cpu.items() if row["error"]} == ERRORS
    for key in ("cmyk.jpg", "plain.png"):  # decoded by PIL in both runs: the join put them back in their rows
        assert gpu[key]["scores"] == cpu[key]["scores"], key
    difference = max(float(np.abs(np.subtract(gpu[key]["scores"], cpu[key]["scores"])).max()) for key in DEVICE_JPEGS)
    bound = dither_bound(load_runtime(tiny_checkpoint, device=device), [root / key for key in DEVICE_JPEGS])
    assert 0 < difference <= bound, (difference, bound)  # 0 would mean the device decoder never ran


def test_the_model_preprocessing_reaches_the_device_decoder(mixed, tiny_checkpoint, tmp_path):
    """A centre-cropping, bicubic model with CLIP's normalisation: the device path follows the model's settings,
    not the squash/bilinear/0.5 defaults (those would move scores by far more than a grey level)."""
    from ramtag.engine.tag import TagOptions, run_tag
    from ramtag.errors import PartialFailure

    root, vocab = mixed
    runtime = load_runtime(tiny_checkpoint, device="cpu")
    pre = runtime.config.preprocessing
    pre.resize, pre.interpolation = "center-crop", "bicubic"
    pre.mean, pre.std = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
    rows = {}
    for decode_mode in ("cpu", "gpu"):
        options = TagOptions(
            [str(root)],
            str(vocab),
            output=str(tmp_path / f"{decode_mode}.parquet"),
            all_scores=True,
            batch_size=4,
            workers=0,
            decode=decode_mode,
            max_pixels=MAX_PIXELS,
            quiet=True,
        )
        with pytest.raises(PartialFailure):
            run_tag(options, runtime)
        rows[decode_mode] = rows_of(options.output)
    difference = max(
        float(np.abs(np.subtract(rows["gpu"][key]["scores"], rows["cpu"][key]["scores"])).max()) for key in DEVICE_JPEGS
    )
    bound = dither_bound(runtime, [root / key for key in DEVICE_JPEGS])
    assert 0 < difference <= bound, (difference, bound)


def test_decode_gpu_without_cuda_is_refused_before_the_model_loads(mixed, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root, vocab = mixed
    missing = tmp_path / "no-such-checkpoint.safetensors"  # loading it would fail with another message
    out = tmp_path / "t.parquet"
    assert run_cli("tag", root, "-l", vocab, "-c", missing, "-o", out, "--decode", "gpu") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--decode gpu needs a CUDA device" in err and "--device cpu" in err
    assert run_cli("tag", root, "-l", vocab, "-c", missing, "--decode", "nvjpeg") == EXIT_USAGE
    assert "--decode must be one of auto, cpu, gpu" in capsys.readouterr().err
    assert not out.exists()


def test_auto_decodes_on_the_device_on_cuda_only():
    assert decodes_on_device("auto", torch.device("cuda")) and not decodes_on_device("auto", torch.device("cpu"))
    assert decodes_on_device("gpu", torch.device("cpu")) and not decodes_on_device("cpu", torch.device("cuda"))


def test_a_refused_jpeg_becomes_its_cpu_decoders_row_and_the_others_keep_their_order(tiny_checkpoint):
    """The join, directly: rows in order whatever the decoder call size; a JPEG the device decoder refuses and the
    CPU one too becomes an error row that keeps its carried columns."""
    runtime = load_runtime(tiny_checkpoint, device="cpu")
    pre = runtime.config.preprocessing
    jpegs = DeviceJpegs(runtime.transform(), pre.image_size, pre.mean, pre.std, pre.resize, pre.interpolation)
    png = io.BytesIO()
    photo(3).save(png, "PNG")
    whole = jpeg(photo(4))
    inputs = [jpeg(photo(0)), png.getvalue(), whole[: len(whole) // 2], jpeg(photo(1, mode="L")), jpeg(photo(2))]
    records = []
    for index, data in enumerate(inputs):
        image, error = decode(data, jpegs)
        records.append(Record(f"k{index}", f"s{index}", image, error, {"n": index}, unit=7))
    assert [type(record.image).__name__ for record in records] == ["EncodedJpeg", "Tensor", *["EncodedJpeg"] * 3]
    joined = []
    for pixels_per_call in (1, 1 << 28):  # one JPEG per decoder call, and all of them in one
        batch = collate_records(records)
        join_device_images(batch, jpegs, "cpu", pixels_per_call=pixels_per_call)
        assert batch.keys == ["k0", "k1", "k3", "k4"] and batch.extra == {"n": [0, 1, 3, 4]}
        assert (batch.failed_keys, batch.failed_errors, batch.failed_extra) == (["k2"], ["truncated"], {"n": [2]})
        assert batch.failed_units == [7] and batch.units == [7] * 4 and not batch.encoded
        joined.append(batch.images)
    assert torch.equal(joined[0], joined[1])
    assert torch.equal(joined[0][1], runtime.transform()(decode_image(inputs[1])))  # the PNG, in its row
    level = 1 / 255 / pre.std[0]
    for row, index in ((0, 0), (2, 3), (3, 4)):
        assert (joined[0][row] - runtime.transform()(decode_image(inputs[index]))).abs().max() <= level * 1.01


def test_scores_on_the_cpu_are_the_models_own_tensor():
    """The CPU path writes exactly what it wrote before: no copy, no new rounding."""
    scores = torch.rand(3, 4)
    assert HostScores(scores).wait() is scores


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_scores_come_back_from_cuda_through_pinned_memory():
    scores = torch.rand(3, 4, device="cuda")
    host = HostScores(scores).wait()
    assert host.device.type == "cpu" and host.is_pinned() and torch.equal(host, scores.cpu())


class _Feed:
    """Stands in for join_device_images: records where and in what order each batch was decoded."""

    def __init__(self, fail_on: int | None = None):
        self.decoded: list[tuple[int, str]] = []
        self.started = {index: threading.Event() for index in range(8)}
        self.fail_on = fail_on

    def __call__(self, batch, jpegs, device, *, max_pixels, draft_size):
        self.started[batch].set()
        if batch == self.fail_on:
            raise RuntimeError(f"nvJPEG failed on batch {batch}")
        self.decoded.append((batch, threading.current_thread().name))


def _fed(monkeypatch, count: int, fail_on: int | None = None):
    import ramtag.engine.device_feed as device_feed

    feed = _Feed(fail_on)
    monkeypatch.setattr(device_feed, "join_device_images", feed)
    pulled = []

    def source():
        for index in range(count):
            pulled.append(index)
            yield index

    jpegs = DeviceJpegs(lambda image: image, 4, (0.5,) * 3, (0.5,) * 3)
    batches = device_feed.device_batches(source(), torch.device("cpu"), jpegs, max_pixels=None, draft_size=None)
    return batches, feed, pulled


def test_device_decoding_runs_a_batch_ahead_on_a_feeder_thread_in_order(monkeypatch):
    batches, feed, _ = _fed(monkeypatch, 4)
    received = []
    for batch in batches:
        received.append(batch)
        if batch + 1 < 4:  # the next batch's decode starts while this one is still held by the loop
            assert feed.started[batch + 1].wait(timeout=10), f"batch {batch + 1} was not decoded ahead"
    assert received == [0, 1, 2, 3]
    assert [index for index, _ in feed.decoded] == [0, 1, 2, 3]
    assert {thread for _, thread in feed.decoded} != {threading.current_thread().name}
    assert all(thread.startswith("ramtag-device-decode") for _, thread in feed.decoded)


def test_a_decode_error_reaches_the_loop_at_its_batch_and_leaving_early_stops_the_feeder(monkeypatch):
    batches, feed, _ = _fed(monkeypatch, 4, fail_on=2)
    received = []
    with pytest.raises(RuntimeError, match="nvJPEG failed on batch 2"):
        for batch in batches:
            received.append(batch)
    assert received == [0, 1]  # the batches before the failed one are handed out whole

    batches, feed, pulled = _fed(monkeypatch, 8)
    assert next(batches) == 0
    batches.close()  # what run_tag does on an interrupt
    assert pulled == [0, 1] and [index for index, _ in feed.decoded] in ([0], [0, 1])
