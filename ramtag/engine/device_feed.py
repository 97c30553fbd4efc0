"""Feed the tag loop's batches to the device and bring scores back, keeping a CUDA device busy.

On CUDA, the next batch is put on the device (its pinned images copied, its JPEGs decoded there, see
:mod:`ramtag.data.device_batch`) on a side stream before the current batch is handed out, so the copy and the
decode run while the current forward does; the compute stream waits for that work only where it uses the batch.
Scores come back by a non-blocking copy into pinned host memory, waited for when the writer needs them.

On the CPU nothing here changes what the loop computes: batches pass through as they are, and scores stay the
tensors the model returned.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ramtag.data.device_batch import join_device_images
from ramtag.data.device_decode import DeviceJpegs
from ramtag.data.records import Batch, Transform
from ramtag.errors import UsageError
from ramtag.model.config import Preprocessing

DECODES = ("auto", "cpu", "gpu")
"""--decode: auto is gpu on CUDA devices and cpu elsewhere."""


def check_decode(decode: str, device: str) -> None:
    """Before a model loads: refuse --decode gpu where no CUDA device would run it. ``--device cpu`` runs the same
    batched decoder on the CPU (torchvision's decoder takes CPU tensors too): asked for by name, it is allowed."""
    if decode not in DECODES:
        raise UsageError(f"--decode must be one of {', '.join(DECODES)}")
    if decode == "gpu" and device != "cpu" and not torch.cuda.is_available():
        raise UsageError(
            "--decode gpu needs a CUDA device and this machine has none; use --decode cpu (or auto), "
            "or --device cpu to run the batched JPEG decoder on the CPU"
        )


def decodes_on_device(decode: str, device: torch.device) -> bool:
    return decode == "gpu" or (decode == "auto" and device.type == "cuda")


def decode_transform(decode: str, device: torch.device, transform: Transform, pre: Preprocessing) -> Transform:
    """The transform the workers get: the CPU one, or a :class:`DeviceJpegs` around it that keeps JPEGs encoded."""
    if not decodes_on_device(decode, device):
        return transform
    return DeviceJpegs(transform, pre.image_size, tuple(pre.mean), tuple(pre.std), pre.resize, pre.interpolation)


def device_batches(
    batches: Iterable[Batch],
    device: torch.device,
    transform: Transform,
    *,
    max_pixels: int | None,
    draft_size: int | None,
) -> Iterator[Batch]:
    """Each batch with its images on ``device``, in the order ``batches`` gives them (one batch ahead on CUDA)."""

    def prepare(batch: Batch) -> None:
        if isinstance(transform, DeviceJpegs):
            join_device_images(batch, transform, device, max_pixels=max_pixels, draft_size=draft_size)
        elif batch.images is not None:
            batch.images = batch.images.to(device, non_blocking=True)

    if device.type != "cuda":
        for batch in batches:
            prepare(batch)
            yield batch
        return
    side = torch.cuda.Stream(device)
    pending: tuple[Batch, torch.cuda.Event] | None = None
    for batch in batches:
        with torch.cuda.stream(side):
            prepare(batch)
            ready = torch.cuda.Event()
            ready.record(side)
        if pending is not None:
            yield _on_compute_stream(*pending)
        pending = (batch, ready)
    if pending is not None:
        yield _on_compute_stream(*pending)


def _on_compute_stream(batch: Batch, ready: torch.cuda.Event) -> Batch:
    stream = torch.cuda.current_stream()
    stream.wait_event(ready)
    if batch.images is not None:  # made on the side stream: its memory must outlive the compute stream's use
        batch.images.record_stream(stream)
    return batch


class HostScores:
    """Scores on their way to host memory: :meth:`wait` gives them, on the CPU once the copy has landed."""

    def __init__(self, scores: torch.Tensor) -> None:
        self._event = None
        if scores.device.type != "cuda":
            self._scores = scores
            return
        self._scores = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
        self._scores.copy_(scores, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._scores
