"""`--compile`: the image forward through ``torch.compile``, at one batch shape, falling back to eager on failure.

Only the vision tower is compiled: it is nearly all of a batch's work (KCOT is under 1% for ViT-B,
benchmarks/README.md), and KCOT's Sinkhorn stops on a data-dependent tolerance test, which would break the graph
and be recompiled for nothing.

One shape, by padding: the last batch of a run is smaller, and so are a batch that lost failed images and each
decoding worker's last batch. Compiled per shape (``dynamic=False``), each new size would cost another compile
(tens of seconds for ViT-B) until dynamo's recompile limit sends it back to eager; compiled with dynamic shapes,
every batch would run slower, generic kernels. So a smaller batch is padded with zeros to the compiled size and
the padded rows are dropped again. The tower treats each image on its own (per-image attention, eval-mode batch
norm), so padding changes no real row; what it costs is the padded rows' compute, on a few batches per run.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

Features = tuple[torch.Tensor, torch.Tensor]


class CompiledVision:
    """Calls like :class:`~ramtag.model.backbone.DualPathVision` (``vision(images, text_features, use_adapters=…)``)
    and runs a ``torch.compile`` of it on batches of exactly ``batch_size`` images.

    If compiling or running the compiled code fails (no C++ compiler for inductor, an unsupported operation),
    ``say`` gets one warning line and every later call runs the eager tower: the run goes on, uncompiled.
    Out-of-memory errors are not compile failures and are raised as they are. ``backend`` is torch.compile's
    (``eager`` traces with dynamo but generates no code: the benchmarks' dry run uses it to stay quick)."""

    def __init__(self, vision: nn.Module, batch_size: int, say: Callable[[str], None], backend: str = "inductor"):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.eager = vision
        self.batch_size = batch_size
        self.backend = backend
        self.say = say
        self.compile_seconds: float | None = None
        """How long the first (compiling) call took; None until it ran."""
        self.failure: str | None = None
        self.compiled: Callable[..., Features] | None = None
        try:  # compiling itself waits for the first call; this fails only where dynamo cannot run at all
            self.compiled = torch.compile(vision, dynamic=False, backend=backend)
        except Exception as error:  # dynamo cannot run here (an unsupported Python): the run goes on uncompiled
            self._fall_back(error)

    def __call__(self, images: torch.Tensor, text_features: torch.Tensor | None = None, use_adapters: bool = True):
        if self.compiled is None:
            return self.eager(images, text_features, use_adapters=use_adapters)
        if len(images) > self.batch_size:  # never from the tag loop; kept correct for other callers
            parts = [self(chunk, text_features, use_adapters) for chunk in images.split(self.batch_size)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        count = len(images)
        if text_features is not None and torch.is_inference_mode_enabled() and not text_features.is_inference():
            # label features loaded from the cache are ordinary tensors, freshly encoded ones inference tensors;
            # dynamo guards on the difference, and a copy of [C, D] is cheaper than a second compile
            text_features = text_features.clone()
        if count < self.batch_size:
            # made as the caller's tensors are (inference tensors or not): dynamo guards on that, and a padded
            # batch of the other kind would be compiled a second time
            with torch.inference_mode(images.is_inference()):
                images = torch.cat([images, images.new_zeros((self.batch_size - count, *images.shape[1:]))])
        started = time.perf_counter()
        try:
            global_feature, regions = self.compiled(images, text_features, use_adapters=use_adapters)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # any compiler failure: the run goes on uncompiled
            self._fall_back(error)
            return self.eager(images[:count], text_features, use_adapters=use_adapters)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - started
            self.say(
                f"ramtag: --compile: compiled the image forward for batches of {self.batch_size} "
                f"in {self.compile_seconds:.1f} s"
            )
        return global_feature[:count], regions[:count]

    def _fall_back(self, error: Exception) -> None:
        self.compiled = None
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        self.failure = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
        self.say(f"ramtag: warning: --compile: torch.compile failed ({self.failure}); running uncompiled")
