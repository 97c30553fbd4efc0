"""Decoding untrusted images: the bad-image zoo, mode conversions, EXIF, pixel caps, preprocessing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ramtag.data.images import ImageDecodeError, decode_image, squash_resize_normalize, to_rgb
from ramtag.errors import DataError
from tests.io_fixtures import encode, image_bytes, png_claiming_size, random_pixels


def reason(data, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, **kwargs)
    assert "\n" not in caught.value.reason
    return caught.value.reason


# -- the bad-image zoo --------------------------------------------------------------------------


def test_truncated_jpeg_is_reported_as_truncated():
    data = image_bytes(1, "JPEG", size=(64, 64))
    assert reason(data[: len(data) // 2]) == "truncated"


def test_corrupt_png_data_is_named_in_plain_words():
    data = bytearray(image_bytes(2, "PNG", size=(32, 32)))
    start = data.index(b"IDAT") + 8
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    assert reason(bytes(data)) == "damaged PNG file: its image data is corrupt"


def _scribble_header(data: bytes) -> bytes:
    return data[:16] + b"\xff" * 8 + data[24:]  # PNG's IHDR size, TIFF's first tag entry


@pytest.mark.parametrize(
    "fmt, damage",
    [("PNG", _scribble_header), ("TIFF", _scribble_header), ("GIF", lambda data: data[:13])],  # GIF: header only
)
def test_a_file_that_starts_like_a_format_but_cannot_be_opened_is_a_damaged_file_of_it(fmt, damage):
    data = image_bytes(3, fmt, size=(32, 32))
    assert reason(damage(data)) == f"damaged {fmt} file: its header cannot be read"


def test_a_png_text_bomb_is_refused_in_words_not_pillow_internals():
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    data = image_bytes(4, "PNG", size=(16, 16))
    text = chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"a" * (2 << 20)))
    at = data.index(b"IDAT") - 4
    message = reason(data[:at] + text + data[at:])
    assert "PNG text chunk" in message and "MAX_TEXT_CHUNK" not in message


def test_decoder_warnings_go_to_the_debug_log_not_the_terminal(capfd, caplog):
    data = image_bytes(5, "TIFF", size=(32, 32))
    with caplog.at_level("DEBUG", logger="ramtag.data.images"):
        reason(data[:100])  # Pillow warns "Truncated File Read" reading the cut-off tag directory
    assert capfd.readouterr().err == ""
    assert any("decoder warning" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("payload", [b"hello, world\n" * 10, bytes(range(256)) * 4])
def test_non_image_bytes_are_not_an_image(payload):
    assert reason(payload) == "not an image"


def test_empty_bytes_and_empty_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert reason(b"") == "empty file"
    assert reason(empty) == "empty file"


def test_missing_file_cannot_be_read(tmp_path):
    assert reason(tmp_path / "absent.png").startswith("cannot read")


def test_pixel_cap_names_the_size():
    assert reason(image_bytes(3, "PNG"), max_pixels=100) == "too many pixels (16 x 16 > 100)"


def test_bomb_header_is_refused_before_decoding():
    # The file is tiny; decoding it would need 30 GB. The default cap is PIL's own limit.
    bomb = png_claiming_size(100_000, 100_000)
    assert len(bomb) < 100
    assert reason(bomb) == f"too many pixels (100000 x 100000 > {Image.MAX_IMAGE_PIXELS})"


def test_a_cap_above_pils_global_limit_is_honoured(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL alone would raise above 20 pixels
    img = decode_image(image_bytes(4, "PNG"), max_pixels=None)
    assert img.size == (16, 16)
    assert Image.MAX_IMAGE_PIXELS == 10
    assert reason(image_bytes(4, "PNG")) == "too many pixels (16 x 16 > 10)"


def test_decode_error_is_a_data_error():
    assert issubclass(ImageDecodeError, DataError)


# -- inputs and modes ---------------------------------------------------------------------------


def test_bytes_path_and_stream_decode_alike(tmp_path):
    data = image_bytes(5, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    expected = random_pixels(5)
    for source in (data, path, str(path), io.BytesIO(data)):
        img = decode_image(source)
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), expected)


def test_greyscale_becomes_three_equal_channels():
    grey = random_pixels(6, channels=1)
    img = decode_image(encode(Image.fromarray(grey, mode="L"), "PNG"))
    np.testing.assert_array_equal(np.asarray(img), np.repeat(grey[..., None], 3, axis=2))


def test_palette_image_uses_its_colours():
    rgb = Image.fromarray(random_pixels(7))
    palette = rgb.quantize(colors=8)
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode_image(encode(palette, "PNG"))), expected)


def test_palette_transparency_is_composited_on_white():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    palette.putpixel((1, 1), 1)
    img = decode_image(encode(palette, "PNG", transparency=0))
    pixels = np.asarray(img)
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[1, 1]) == (200, 100, 50)


def test_rgba_is_composited_on_white():
    colour = np.array([40, 120, 200], dtype=np.float64)
    alphas = np.array([0, 64, 128, 255], dtype=np.uint8)
    rgba = np.zeros((1, 4, 4), dtype=np.uint8)
    rgba[0, :, :3] = colour
    rgba[0, :, 3] = alphas
    img = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    weight = alphas[:, None] / 255.0
    expected = colour * weight + 255.0 * (1 - weight)
    np.testing.assert_allclose(np.asarray(img)[0], expected, atol=1)


def test_la_is_composited_on_white():
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[..., 0] = 90
    la[0, :, 1] = 255
    la[1, :, 1] = 0
    pixels = np.asarray(decode_image(encode(Image.fromarray(la, mode="LA"), "PNG")))
    assert (pixels[0] == 90).all()
    assert (pixels[1] == 255).all()


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.fromarray(random_pixels(8)).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    levels = np.array([[0, 257 * 128, 65535, 257]], dtype=np.uint16)
    data = encode(Image.fromarray(levels), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = np.asarray(decode_image(data))[0, :, 0]
    np.testing.assert_array_equal(pixels, levels[0] // 257)


def test_float_greyscale_in_unit_range_is_scaled():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    pixels = np.asarray(to_rgb(Image.fromarray(values, mode="F")))[0, :, 0]
    np.testing.assert_array_equal(pixels, np.rint(values[0] * 255))


def test_exif_orientation_is_applied():
    pixels = random_pixels(9, size=(16, 8))  # 16 wide, 8 high
    source = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img = decode_image(encode(source, "PNG", exif=exif.tobytes()))
    assert img.size == (8, 16)
    np.testing.assert_array_equal(np.asarray(img), np.rot90(pixels, k=-1))


def test_animated_gif_gives_its_first_frame():
    frames = [Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)) for value in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert (np.asarray(decode_image(buffer.getvalue())) == 0).all()


def test_draft_decodes_large_jpeg_at_reduced_scale():
    data = image_bytes(10, "JPEG", size=(256, 192))
    assert decode_image(data).size == (256, 192)
    small = decode_image(data, draft_size=40)
    assert small.mode == "RGB"
    assert 40 <= min(small.size) and small.size[0] < 256
    assert decode_image(image_bytes(10, "PNG", size=(64, 48)), draft_size=8).size == (64, 48)  # JPEG only


# -- preprocessing ------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_squash_resize_normalize_matches_torchvision(interpolation):
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    img = Image.fromarray(random_pixels(11, size=(40, 24)))
    mean, std = (0.48, 0.45, 0.41), (0.27, 0.26, 0.28)
    reference = T.Compose(
        [T.Resize((32, 32), interpolation=InterpolationMode(interpolation)), T.ToTensor(), T.Normalize(mean, std)]
    )(img)
    ours = squash_resize_normalize(img, 32, mean, std, interpolation)
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_squash_resize_normalize_of_a_flat_colour():
    colour = (30, 160, 250)
    img = Image.new("RGB", (20, 10), colour)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    out = squash_resize_normalize(img, 8, mean, std)
    for channel in range(3):
        expected = (colour[channel] / 255 - mean[channel]) / std[channel]
        torch.testing.assert_close(out[channel], torch.full((8, 8), expected), atol=1e-5, rtol=0)


# -- what C decoders write to stderr ------------------------------------------------------------


def corrupt_deflate_tiff(seed: int) -> bytes:
    """A deflate TIFF whose compressed strip is scrambled: Pillow decodes it through libtiff, whose default
    error handler writes "ZIPDecode: Decoding error ..." to fd 2 (Pillow silences libtiff's warnings only)."""
    data = bytearray(encode(Image.fromarray(random_pixels(seed, (48, 48))), "TIFF", compression="tiff_deflate"))
    start = Image.open(io.BytesIO(bytes(data))).tag_v2[273][0]  # StripOffsets: where the compressed data begins
    data[start + 8 : start + 72] = bytes(b ^ 0x5A for b in data[start + 8 : start + 72])
    return bytes(data)


_NATIVE_STDERR_SCRIPT = """
import logging, sys
from ramtag.data.images import ImageDecodeError, capture_native_stderr, decode_image
logging.basicConfig(stream=sys.stderr, level=logging.DEBUG, format="debug: %(message)s")
data = open(sys.argv[1], "rb").read()
for phase in ("plain", "captured"):
    if phase == "captured":
        capture_native_stderr()
    print(f"== {phase}", file=sys.stderr, flush=True)
    try:
        decode_image(data)
    except ImageDecodeError as error:
        print(f"ramtag: {error.reason}", file=sys.stderr, flush=True)
"""


def test_a_decode_worker_logs_what_libtiff_writes_to_stderr_and_keeps_its_own_lines(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "broken.tif"
    path.write_bytes(corrupt_deflate_tiff(6))
    run = subprocess.run(
        [sys.executable, "-c", _NATIVE_STDERR_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    plain, captured = run.stderr.split("== captured\n")
    # The file does make libtiff write to fd 2 (else this test would prove nothing) ...
    assert any(line.startswith("ZIPDecode") for line in plain.splitlines())
    lines = captured.splitlines()
    # ... and once captured, nothing of it reaches stderr as is: it is one debug-log line per message,
    assert not any(line.startswith("ZIPDecode") for line in lines)
    assert any(line.startswith("debug: decoder message: ZIPDecode") for line in lines)
    # while ramtag's own line, written after the decode, still reaches stderr.
    assert "ramtag: damaged TIFF file: its image data is corrupt" in lines


def test_tag_keeps_libtiff_errors_off_the_terminal(tmp_path, capfd):
    import json

    from ramtag.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.tif").write_bytes(corrupt_deflate_tiff(7))
    (folder / "good.png").write_bytes(image_bytes(8, "PNG", size=(32, 32)))
    (tmp_path / "vocab.txt").write_text("red\nblue\n")
    with pytest.raises(SystemExit):
        main(["tag", str(folder), "-l", str(tmp_path / "vocab.txt"), "--model", "demo", "--workers", "1", "-o", "-"])
    out, err = capfd.readouterr()
    rows = {row["key"]: row for row in map(json.loads, out.splitlines())}
    assert rows["broken.tif"]["error"] == "damaged TIFF file: its image data is corrupt"
    assert rows["good.png"]["error"] is None
    assert "ZIPDecode" not in err  # the decode worker's fd 2 went to the debug log
    # ramtag's own lines about that image, all from the main process, are all there
    assert "ramtag: broken.tif: damaged TIFF file: its image data is corrupt" in err
    assert "ramtag: error: 1 input(s) could not be tagged" in err


_MAIN_PROCESS_SCRIPT = """
import logging, sys
import ramtag.data.images as images
from ramtag.data.images import ImageDecodeError, decode_image, native_stderr_to_log
logging.basicConfig(stream=sys.stderr, level=logging.DEBUG, format="debug: %(message)s")
decode_open_stream = images._decode_open_stream

def decode_while_ramtag_writes(*args, **kwargs):
    # what the progress display's thread does at any moment: a Python-level line while fd 2 is swapped
    print("ramtag: a line written while the decoder runs", file=sys.stderr, flush=True)
    return decode_open_stream(*args, **kwargs)

images._decode_open_stream = decode_while_ramtag_writes
data = open(sys.argv[1], "rb").read()
with native_stderr_to_log():
    try:
        decode_image(data)
    except ImageDecodeError as error:
        print(f"ramtag: {error.reason}", file=sys.stderr, flush=True)
print("ramtag: after the block", file=sys.stderr, flush=True)
"""


def test_the_main_process_logs_what_libtiff_writes_and_keeps_every_python_line(tmp_path):
    """--workers 0 decodes in the process that prints ramtag's messages and the progress bar: fd 2 is swapped
    around each decode, and Python's stderr writes to a copy of it meanwhile."""
    import subprocess
    import sys

    path = tmp_path / "broken.tif"
    path.write_bytes(corrupt_deflate_tiff(6))
    run = subprocess.run(
        [sys.executable, "-c", _MAIN_PROCESS_SCRIPT, str(path)], capture_output=True, text=True, timeout=120, check=True
    )
    lines = run.stderr.splitlines()
    assert not any(line.startswith("ZIPDecode") for line in lines)
    assert any(line.startswith("debug: decoder message: ZIPDecode") for line in lines)
    # a Python line written inside the window reaches stderr as is, not the debug log
    assert "ramtag: a line written while the decoder runs" in lines
    assert not any("decoder message: ramtag:" in line for line in lines)
    assert "ramtag: damaged TIFF file: its image data is corrupt" in lines
    assert lines[-1] == "ramtag: after the block"  # sys.stderr is given back, and it still works


def test_tag_with_no_workers_keeps_libtiff_errors_off_the_terminal(tmp_path, capfd):
    import json

    from ramtag.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.tif").write_bytes(corrupt_deflate_tiff(7))
    (folder / "good.png").write_bytes(image_bytes(8, "PNG", size=(32, 32)))
    (tmp_path / "vocab.txt").write_text("red\nblue\n")
    with pytest.raises(SystemExit):
        main(["tag", str(folder), "-l", str(tmp_path / "vocab.txt"), "--model", "demo", "--workers", "0", "-o", "-"])
    out, err = capfd.readouterr()
    rows = {row["key"]: row for row in map(json.loads, out.splitlines())}
    assert rows["broken.tif"]["error"] == "damaged TIFF file: its image data is corrupt"
    assert rows["good.png"]["error"] is None
    assert "ZIPDecode" not in err  # decoded in this process, and still its fd 2 went to the debug log
    assert "ramtag: broken.tif: damaged TIFF file: its image data is corrupt" in err
    assert "ramtag: error: 1 input(s) could not be tagged" in err
