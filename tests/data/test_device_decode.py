"""The batched JPEG decoder (nvJPEG on CUDA) against the CPU path it must match, and what it hands back to it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ramtag.data.device_decode import decode_batch, probe_jpeg
from ramtag.data.images import decode_image, squash_resize_normalize
from ramtag.engine.preprocess import make_transform
from ramtag.model.config import Preprocessing

MEAN = STD = (0.5, 0.5, 0.5)
LEVEL = 1 / 255 / STD[0]  # one 8-bit grey level in normalised units

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]


def photo(seed: int, size=(320, 240), mode="RGB") -> Image.Image:
    """A smooth gradient with texture: resizing it exercises the filters, unlike flat noise or flat colour."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    pixels = (ramp + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def jpeg(img: Image.Image, orientation: int | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif
    img.save(buffer, "JPEG", quality=92, **save)
    return buffer.getvalue()


def cpu_tensor(data: bytes, pre: Preprocessing) -> torch.Tensor:
    return make_transform(pre)(decode_image(data))


def device_tensor(data: bytes, pre: Preprocessing, device: str) -> torch.Tensor:
    orientation = probe_jpeg(data)
    assert orientation is not None
    out, refused = decode_batch(
        [data], [orientation], device, pre.image_size, pre.mean, pre.std, pre.resize, pre.interpolation
    )
    assert refused == []
    return out[0].cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "pre",
    [
        Preprocessing(image_size=64, mean=MEAN, std=STD, resize="squash", interpolation="bilinear"),
        Preprocessing(image_size=64, mean=MEAN, std=STD, resize="squash", interpolation="bicubic"),
        Preprocessing(image_size=48, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), resize="center-crop"),
    ],
    ids=["squash-bilinear", "squash-bicubic", "center-crop"],
)
def test_device_decoding_matches_the_cpu_path_within_a_grey_level(pre, device):
    for seed, size in [(0, (320, 240)), (1, (97, 203)), (2, (64, 64))]:
        data = jpeg(photo(seed, size))
        difference = (device_tensor(data, pre, device) - cpu_tensor(data, pre)).abs()
        levels = difference * torch.tensor(pre.std).view(3, 1, 1) * 255
        # Measured on CPU: at most 1 level anywhere, about 0.13 on average (rounding of two antialias filters).
        assert levels.max() <= 1.01, (seed, size, float(levels.max()))
        assert levels.mean() < 0.3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_does(orientation, device):
    pre = Preprocessing(image_size=40, mean=MEAN, std=STD)
    data = jpeg(photo(orientation, (120, 64)), orientation=orientation)
    assert probe_jpeg(data) == orientation
    difference = (device_tensor(data, pre, device) - cpu_tensor(data, pre)).abs().max()
    assert difference <= LEVEL * 1.01


@pytest.mark.parametrize("device", DEVICES)
def test_greyscale_jpegs_become_rgb_like_the_cpu_path(device):
    pre = Preprocessing(image_size=32, mean=MEAN, std=STD)
    data = jpeg(photo(5, mode="L"))
    assert (device_tensor(data, pre, device) - cpu_tensor(data, pre)).abs().max() <= LEVEL * 1.01


def test_what_the_device_decoder_would_decode_differently_stays_on_the_cpu():
    png = io.BytesIO()
    photo(0).save(png, "PNG")
    cmyk = jpeg(photo(1, mode="CMYK"))
    good = jpeg(photo(2))
    assert probe_jpeg(png.getvalue()) is None
    assert probe_jpeg(cmyk) is None  # Adobe CMYK: PIL's conversion is the reference
    assert probe_jpeg(b"") is None
    assert probe_jpeg(b"\xff\xd8\xff\xe0 not really a jpeg") is None
    assert probe_jpeg(good, max_pixels=320 * 240 - 1) is None  # over the cap: the CPU path writes the error row
    assert probe_jpeg(good, max_pixels=320 * 240) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_a_refused_jpeg_is_handed_back_and_its_batch_mates_are_kept(device):
    pre = Preprocessing(image_size=32, mean=MEAN, std=STD)
    good = [jpeg(photo(seed)) for seed in range(3)]
    truncated = good[1][: len(good[1]) // 2]
    out, refused = decode_batch(
        [good[0], truncated, good[2]], [1, 1, 1], device, pre.image_size, pre.mean, pre.std
    )
    assert refused == [1] and out[1] is None
    for index in (0, 2):
        assert (out[index].cpu() - cpu_tensor(good[index], pre)).abs().max() <= LEVEL * 1.01
    with pytest.raises(Exception, match="truncated"):  # what the CPU fallback then records
        decode_image(truncated)


def test_squash_matches_the_documented_cpu_transform():
    """The comparison above is against the transform the tag loop really uses."""
    pre = Preprocessing(image_size=32, mean=MEAN, std=STD, resize="squash", interpolation="bilinear")
    img = decode_image(jpeg(photo(9)))
    expected = squash_resize_normalize(img, 32, MEAN, STD, "bilinear")
    assert torch.equal(make_transform(pre)(img), expected)
