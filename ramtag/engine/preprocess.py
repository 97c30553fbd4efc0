"""The image transform a model's preprocessing settings describe (picklable, for DataLoader workers)."""

from __future__ import annotations

from functools import partial

import torch
from PIL import Image

from ramtag.data.images import squash_resize_normalize
from ramtag.model.config import Preprocessing


def _center_crop(img: Image.Image, size: int, mean, std, interpolation: str) -> torch.Tensor:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    resized = TF.resize(img, size, interpolation=InterpolationMode(interpolation))
    cropped = TF.center_crop(resized, [size, size])
    return TF.normalize(TF.to_tensor(cropped), mean=list(mean), std=list(std))


def make_transform(pre: Preprocessing):
    """PIL RGB image -> normalised tensor [3, size, size]."""
    if pre.resize == "squash":
        return partial(
            squash_resize_normalize,
            size=pre.image_size,
            mean=tuple(pre.mean),
            std=tuple(pre.std),
            interpolation=pre.interpolation,
        )
    if pre.resize == "center-crop":
        return partial(
            _center_crop, size=pre.image_size, mean=tuple(pre.mean), std=tuple(pre.std), interpolation=pre.interpolation
        )
    raise ValueError(f"unknown resize mode {pre.resize!r} (squash or center-crop)")
