"""Feed the tag loop's batches to the device and bring scores back, keeping a CUDA device busy.

On CUDA, the next batch is put on the device (its pinned images copied, its JPEGs decoded there, see
:mod:`ramtag.data.device_batch`) on a side stream before the current batch is handed out, so the copy and the
decode run while the current forward does; the compute stream waits for that work only where it uses the batch.
Scores come back by a non-blocking copy into pinned host memory, waited for when the writer needs them.

Batches with JPEGs to decode on the device are decoded by one feeder thread, a batch ahead of the loop: the
decoder's host-side work (parsing, Huffman decoding, queueing kernels, the CPU fallback for refused files) then
runs while the loop waits for the current forward, instead of between two forwards with the device idle. One
thread keeps the batches in order; its errors reach the loop when the batch it failed on is asked for. The same
thread runs with ``--device cpu --decode gpu``, without streams.

On the CPU nothing here changes what the loop computes: batches pass through as they are, and scores stay the
tensors the model returned.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

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
    """Each batch with its images on ``device``, in the order ``batches`` gives them (one batch ahead on CUDA, and
    wherever JPEGs are decoded on the device)."""
    if isinstance(transform, DeviceJpegs):
        yield from _decoded_ahead(batches, device, transform, max_pixels=max_pixels, draft_size=draft_size)
        return

    def prepare(batch: Batch) -> None:
        if batch.images is not None:
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


def _decoded_ahead(
    batches: Iterable[Batch],
    device: torch.device,
    jpegs: DeviceJpegs,
    *,
    max_pixels: int | None,
    draft_size: int | None,
) -> Iterator[Batch]:
    """``batches`` with their JPEGs decoded on ``device`` by a feeder thread, one batch ahead of the consumer."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def prepare(batch: Batch) -> tuple[Batch, torch.cuda.Event | None]:
        if side is None:
            join_device_images(batch, jpegs, device, max_pixels=max_pixels, draft_size=draft_size)
            return batch, None
        # a new thread starts on cuda:0 whatever device the loop's thread chose (torchrun's local rank)
        with torch.cuda.device(device), torch.cuda.stream(side):
            join_device_images(batch, jpegs, device, max_pixels=max_pixels, draft_size=draft_size)
            ready = torch.cuda.Event()
            ready.record(side)
        return batch, ready

    def handed_out(future: Future) -> Batch:
        batch, ready = future.result()  # the feeder's exception, if any, is raised here, for this batch
        return batch if ready is None else _on_compute_stream(batch, ready)

    pending: deque[Future] = deque()
    # Leaving early (an interrupt, an error in the loop) waits for the one decode under way, then stops.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ramtag-device-decode") as feeder:
        try:
            for batch in batches:
                pending.append(feeder.submit(prepare, batch))
                if len(pending) > 1:
                    yield handed_out(pending.popleft())
            while pending:
                yield handed_out(pending.popleft())
        finally:
            for future in pending:
                future.cancel()


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
