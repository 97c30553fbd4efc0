"""Decode JPEGs in batches on the model's device (nvJPEG on CUDA) and resize them there.

The CPU path (:mod:`ramtag.data.images`) stays the reference: this one must give the same image a tensor within
a few grey levels of it, so it only takes what it can decode the same way. :func:`probe_jpeg` runs where the
bytes are read (a DataLoader worker) and reads the header only: a JPEG in RGB or greyscale within the pixel cap
goes to the device with its EXIF orientation; anything else (PNG, CMYK or YCCK JPEG, a broken header, too many
pixels) is decoded on the CPU as before, so bad-image rows and the pixel cap are the CPU path's own.

:func:`decode_batch` then decodes a list of such JPEGs in one call and returns the indices the decoder refused
(nvJPEG refuses some files PIL reads); the caller decodes those on the CPU, so no row is lost. Orientation is
applied on the device because torchvision applies EXIF orientation on the CPU only.

:class:`DeviceJpegs` is the transform the tag loop's workers get in that mode: it keeps the JPEGs the probe
accepts as :class:`EncodedJpeg` bytes and hands everything else to the CPU transform it wraps
(:mod:`ramtag.data.device_batch` joins the two in the main process).

Resizing matches torchvision's PIL path: antialiased, the same interpolation, the same output size rule
(squash to a square, or shorter side then a centre crop), rounded to 8-bit levels as PIL's resize is, then
scaled to [0, 1] and normalised.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ramtag.data.images import PIL_LIMIT, _resolve_cap

_DEVICE_MODES = frozenset({"RGB", "L"})
_ORIENTATION_TAG = 0x0112


def probe_jpeg(data: bytes, max_pixels: int | None = PIL_LIMIT) -> int | None:
    """The EXIF orientation (1-8) of a JPEG the device decoder can take, or None to decode it on the CPU."""
    header = _probe(data, max_pixels)
    return None if header is None else header[0]


def _probe(data: bytes, max_pixels: int | None) -> tuple[int, int] | None:
    """(orientation, width x height) of a JPEG for the device decoder, or None."""
    if len(data) < 4 or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG" or img.mode not in _DEVICE_MODES:
                    return None
                cap = _resolve_cap(max_pixels)
                width, height = img.size
                if width == 0 or height == 0 or (cap is not None and width * height > cap):
                    return None
                orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # the CPU decoder gives the reason in the row
        return None
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
    return orientation, width * height


@dataclass
class EncodedJpeg:
    """A JPEG that travels from its worker as bytes, to be decoded in the main process with its batch-mates."""

    data: bytes
    orientation: int
    pixels: int


@dataclass(frozen=True)
class DeviceJpegs:
    """The decode stage's transform when JPEGs are decoded on the model's device (``ramtag tag --decode gpu``).

    :func:`ramtag.data.records.decode` hands it each input: a JPEG :func:`probe_jpeg` accepts becomes an
    :class:`EncodedJpeg` (the header is all a worker reads), anything else goes through ``transform``, the CPU
    path's own. The other fields are the model's preprocessing, which the device resize follows to the letter.
    Picklable: DataLoader workers receive it."""

    transform: Callable[[Any], torch.Tensor]
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "squash"
    interpolation: str = "bilinear"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def encode(self, data: Any, max_pixels: int | None) -> tuple[EncodedJpeg | None, Any]:
        """(the JPEG to decode on the device, or None; what the CPU decoder reads instead: the bytes once read)."""
        if isinstance(data, (str, os.PathLike)):
            try:
                with open(data, "rb") as file:
                    data = file.read()
            except OSError:  # the CPU decoder reads it again and names the reason in the row
                return None, data
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return None, data
        data = bytes(data)
        header = _probe(data, max_pixels)
        return (None, data) if header is None else (EncodedJpeg(data, *header), data)

    def decode(self, jpegs: Sequence[EncodedJpeg], device: torch.device | str) -> list[torch.Tensor | None]:
        """:func:`decode_batch` with this model's preprocessing: a tensor per JPEG, None where refused."""
        out, _ = decode_batch(
            [jpeg.data for jpeg in jpegs], [jpeg.orientation for jpeg in jpegs], device, self.size, self.mean,
            self.std, self.resize, self.interpolation,
        )
        return out


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a [C, H, W] tensor, as PIL's ImageOps.exif_transpose does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return image.transpose(-1, -2).flip(-2)
    return image


def resize_normalize(
    image: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: str = "squash",
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """uint8 [3, H, W] (any device) -> normalised float [3, size, size], the tensor twin of the PIL transforms."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode(interpolation)
    pixels = image.unsqueeze(0).float()
    if resize == "squash":
        pixels = TF.resize(pixels, [size, size], interpolation=mode, antialias=True)
    elif resize == "center-crop":
        pixels = TF.center_crop(TF.resize(pixels, size, interpolation=mode, antialias=True), [size, size])
    else:
        raise ValueError(f"unknown resize mode {resize!r} (squash or center-crop)")
    pixels = pixels.clamp_(0, 255).round_().div_(255)  # PIL resizes in 8 bits
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels - mean_t) / std_t)[0]


def decode_batch(
    datas: Sequence[bytes],
    orientations: Sequence[int],
    device: torch.device | str,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: str = "squash",
    interpolation: str = "bilinear",
) -> tuple[list[torch.Tensor | None], list[int]]:
    """Decode and transform JPEGs on ``device``: (one tensor per input, None where refused; refused indices)."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg

    def decode_jpeg(*args, **kwargs):
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec, not in our stack
            warnings.simplefilter("ignore", DeprecationWarning)
            return _decode_jpeg(*args, **kwargs)

    if len(datas) != len(orientations):
        raise ValueError("one orientation per image")
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    if torch.device(device).type == "cuda":
        # torchvision's nvJPEG path writes its output on a private stream that does not wait for the caller's:
        # a block the caching allocator recycled from kernels still queued here would be overwritten under them
        # (pytorch/vision PR 9606). Draining the calling stream first is the fix its author measured; on the
        # side stream the tag loop decodes on, that waits for earlier copies and resizes only, not the forward.
        torch.cuda.current_stream(device).synchronize()
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole call: find it by decoding one at a time
        decoded = []
        for one in encoded:
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    out: list[torch.Tensor | None] = []
    refused = []
    for index, (image, orientation) in enumerate(zip(decoded, orientations)):
        if image is None or image.ndim != 3 or image.shape[0] != 3:
            out.append(None)
            refused.append(index)
            continue
        out.append(resize_normalize(_orient(image, orientation), size, mean, std, resize, interpolation))
    return out, refused
