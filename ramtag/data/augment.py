"""Training-time image augmentation, after the reference's recipe, with all randomness from one generator.

Reference (its `make_dataloader` and `ImageDataset`): horizontal flip; an imgaug sequence in random order
(sometimes a crop of up to 10% per side, a slight Gaussian blur, a contrast change, an affine warp; always
additive Gaussian noise and a brightness multiply); bicubic squash resize; pad 10 and random crop back to
size; normalise; random erasing with per-pixel noise (p = 0.5).

Differences, all deliberate: the crop is taken in the source image and folded into the single resize; the
photometric and affine steps run at the training size (cheaper, same strengths); the affine warp uses one
scale for both axes; the reference's two independent flips (probability 0.5 each, so 0.5 overall) are one.

Every random draw comes from the `generator` passed in, so the engine can seed each sample from
(seed, epoch, index): augmentation then does not depend on DataLoader workers and a resumed run sees the same
images as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, probability: float) -> bool:
    return probability > 0 and float(torch.rand((), generator=generator)) < probability


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator))


@dataclass
class TrainAugment:
    """PIL RGB image -> normalised [3, size, size] tensor, randomly augmented."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    padding: int = 10
    flip: float = 0.5
    erase: float = 0.5
    photometric: bool = True
    """Crop, blur, contrast, affine, noise and brightness steps of the reference's imgaug sequence."""
    step_probability: float = 0.2
    """Probability of each 'sometimes' step (crop, blur, contrast, affine), as in the reference."""

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        if _chance(generator, self.flip):
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left, top, right, bottom = 0, 0, image.width, image.height
        if self.photometric and _chance(generator, self.step_probability):
            fractions = [_uniform(generator, 0.0, 0.1) for _ in range(4)]
            left = int(round(fractions[0] * image.width))
            top = int(round(fractions[1] * image.height))
            right = max(left + 1, image.width - int(round(fractions[2] * image.width)))
            bottom = max(top + 1, image.height - int(round(fractions[3] * image.height)))
        x = TF.to_tensor(
            TF.resized_crop(
                image,
                top,
                left,
                bottom - top,
                right - left,
                [self.size, self.size],
                interpolation=InterpolationMode.BICUBIC,
            )
        ).clamp_(0.0, 1.0)
        if self.photometric:
            x = self._photometric(x, generator)
        if self.padding > 0:
            x = self._pad_and_crop(x, generator)
        x = TF.normalize(x, mean=list(self.mean), std=list(self.std))
        if _chance(generator, self.erase):
            x = self._erase(x, generator)
        return x

    def _photometric(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        steps = [self._blur, self._contrast, self._affine, self._noise, self._multiply]
        order = torch.randperm(len(steps), generator=generator).tolist()
        for index in order:
            x = steps[index](x, generator)
        return x.clamp_(0.0, 1.0)

    def _blur(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        if not _chance(generator, self.step_probability):
            return x
        sigma = _uniform(generator, 0.0, 0.2)
        return TF.gaussian_blur(x, kernel_size=3, sigma=sigma) if sigma > 1e-3 else x

    def _contrast(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not _chance(generator, self.step_probability):
            return x
        return (x - 0.5) * _uniform(generator, 0.75, 1.25) + 0.5

    def _affine(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        if not _chance(generator, self.step_probability):
            return x
        scale = _uniform(generator, 0.9, 1.1)
        shift = [int(round(_uniform(generator, -0.1, 0.1) * self.size)) for _ in range(2)]
        angle = _uniform(generator, -10.0, 10.0)
        return TF.affine(
            x,
            angle=angle,
            translate=shift,
            scale=scale,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=0.0,
        )

    def _noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        scale = _uniform(generator, 0.0, 0.015)
        shape = x.shape if _chance(generator, 0.2) else (1, *x.shape[1:])
        return x + torch.randn(shape, generator=generator) * scale

    def _multiply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if _chance(generator, 0.2):
            factors = 0.9 + 0.2 * torch.rand((x.shape[0], 1, 1), generator=generator)
        else:
            factors = torch.tensor(_uniform(generator, 0.9, 1.1))
        return x * factors

    def _pad_and_crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        padded = torch.nn.functional.pad(x, [self.padding] * 4)
        top = _randint(generator, 0, 2 * self.padding)
        left = _randint(generator, 0, 2 * self.padding)
        return padded[:, top : top + self.size, left : left + self.size]

    def _erase(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """timm's RandomErasing, mode 'pixel', one rectangle: area 2%-33%, aspect 0.3-3.3, up to 10 tries."""
        channels, height, width = x.shape
        area = height * width
        for _ in range(10):
            target = _uniform(generator, 0.02, 1 / 3) * area
            aspect = math.exp(_uniform(generator, math.log(0.3), math.log(1 / 0.3)))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < h < height and 0 < w < width:
                top = _randint(generator, 0, height - h)
                left = _randint(generator, 0, width - w)
                x = x.clone()
                x[:, top : top + h, left : left + w] = torch.randn((channels, h, w), generator=generator)
                break
        return x


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed from the run seed, the epoch and the sample's index in the dataset."""
    return (seed * 1_000_003 + epoch * 2_147_483_647 + index * 6_364_136_223) % (2**63 - 1)
