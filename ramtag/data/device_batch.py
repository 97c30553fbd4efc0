"""Finish a batch whose JPEGs came from the workers still encoded: decode them on the model's device and join them
with the batch's CPU-decoded images, in the batch's row order.

A JPEG the device decoder refuses (nvJPEG turns down some files PIL reads, and a truncated one) is decoded again on
the CPU with the CPU path's own transform, cap and draft size; where that fails too, the row becomes an error row
with the CPU decoder's reason. So a batch keeps every row, as on the CPU path, and the same rows fail.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ramtag.data.device_decode import DeviceJpegs, EncodedJpeg
from ramtag.data.images import PIL_LIMIT
from ramtag.data.records import Batch, decode

PIXELS_PER_CALL = 1 << 28
"""Decoded pixels one decoder call holds at once (about 0.8 GB of RGB): a batch of 256 twelve-megapixel photos
would otherwise hold 9 GB of decoded images on the device before any is resized."""


def _chunks(jpegs: Sequence[EncodedJpeg], budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive (start, stop) runs of ``jpegs`` of at most ``budget`` pixels (at least one JPEG each)."""
    start, pixels = 0, 0
    for index, jpeg in enumerate(jpegs):
        if index > start and pixels + jpeg.pixels > budget:
            yield start, index
            start, pixels = index, 0
        pixels += jpeg.pixels
    if start < len(jpegs):
        yield start, len(jpegs)


def join_device_images(
    batch: Batch,
    jpegs: DeviceJpegs,
    device: torch.device | str,
    *,
    max_pixels: int | None = PIL_LIMIT,
    draft_size: int | None = None,
    pixels_per_call: int = PIXELS_PER_CALL,
) -> None:
    """In place: ``batch.images`` becomes every good row's image on ``device``, in row order (the CPU-decoded ones
    copied without blocking: pinned memory makes that asynchronous on CUDA), and ``batch.encoded`` empties."""
    if batch.images is not None:
        batch.images = batch.images.to(device, non_blocking=True)
    if not batch.encoded:
        return
    decoded: list[torch.Tensor | None] = []
    for start, stop in _chunks(batch.encoded, pixels_per_call):
        decoded += jpegs.decode(batch.encoded[start:stop], device)
    errors = {}
    for index, image in enumerate(decoded):
        if image is None:  # refused on the device: the CPU decoder decodes it or names what is wrong with it
            image, error = decode(batch.encoded[index].data, jpegs.transform, max_pixels, draft_size)
            if image is None:
                errors[batch.encoded_at[index]] = error or "cannot decode"
            else:
                decoded[index] = image.to(device)
    on_device = dict(zip(batch.encoded_at, decoded))
    on_cpu = iter(batch.images if batch.images is not None else ())
    rows = [on_device[row] if row in on_device else next(on_cpu) for row in range(len(batch.keys))]
    kept = [image for row, image in enumerate(rows) if row not in errors]
    batch.images = torch.stack(kept) if kept else None
    batch.encoded, batch.encoded_at = [], []
    if errors:
        batch.fail_rows(errors)
