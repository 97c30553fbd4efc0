"""Tiny open_clip CLIP models and RAM models built in-process from seeds, shared by the model tests.

Two shapes:
- `tiny_clip`: width 64, head width 32, fast; for behaviour tests.
- `openai_compatible_clip`: head width 64 (what open_clip infers from an OpenAI-format state dict), so that
  a backbone stored in a checkpoint rebuilds without its name.
"""

from __future__ import annotations

import math

import torch

from ramtag.model.config import RamConfig
from ramtag.model.ram import RamModel

IMAGE_SIZE = 32
PATCH_SIZE = 8
CONTEXT_LENGTH = 16
VOCAB_SIZE = 49408
LOGIT_SCALE = 100.0
"""exp of the backbone's logit scale, as in OpenAI CLIP (open_clip's random init would give 1/0.07)."""

LABELS = ("cat", "dog", "red car", "tree", "person", "blue sky")


def tiny_clip(seed: int = 0, embed_dim: int = 64, width: int = 64, layers: int = 4, head_width: int = 32):
    """A small QuickGELU open_clip CLIP with random weights and a logit scale of 100."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=embed_dim,
        vision_cfg=dict(
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, width=width, layers=layers, head_width=head_width
        ),
        text_cfg=dict(
            context_length=CONTEXT_LENGTH, vocab_size=VOCAB_SIZE, width=width, heads=width // head_width, layers=layers
        ),
        quick_gelu=True,
    )
    with torch.no_grad():
        model.logit_scale.fill_(math.log(LOGIT_SCALE))
    return model.eval()


def openai_compatible_clip(seed: int = 0, layers: int = 4):
    """A tiny CLIP in the shape `open_clip.model.build_model_from_openai_state_dict` infers from its state
    (head width 64): a backbone stored in a checkpoint rebuilds from its tensors, without a name."""
    return tiny_clip(seed=seed, embed_dim=64, width=128, layers=layers, head_width=64)


def tiny_config(**overrides) -> RamConfig:
    """A trained-mode RAM config for a 4-layer tiny CLIP: adapters and prompts at layers 2 and 3."""
    settings = dict(
        backbone="tiny-test",
        pretrained=None,
        adapter_layers=(2, 3),
        adapter_tokens=3,
        prompt_layers=(2, 3),
        prompt_tokens=2,
        trained=True,
    )
    settings.update(overrides)
    return RamConfig(**settings)


def randomise_adapters(model: RamModel, seed: int) -> RamModel:
    """Non-trivial batch-norm statistics and norm biases in the adapters (they start at 0/1 and 0, which would
    hide a wrong normalisation or a dropped bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.trainable_state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.02)
    return model


def tiny_ram(seed: int = 0, clip=None, **config_overrides) -> RamModel:
    """A RAM model around `clip` (a fresh `tiny_clip(seed)` by default), in eval mode."""
    clip = tiny_clip(seed) if clip is None else clip
    torch.manual_seed(seed + 1)
    model = RamModel(clip, tiny_config(**config_overrides))
    return randomise_adapters(model, seed + 2).eval()


def tokens(labels=LABELS, template: str = "A photo of a {}.", context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    import open_clip

    return open_clip.tokenize([template.format(label) for label in labels], context_length=context_length)


def images(batch: int = 2, seed: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Inputs in [-1, 1], the range of images normalised with mean = std = 0.5."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3, size, size), generator=gen) * 2.0 - 1.0


def multi_hot(batch: int, labels: int, seed: int = 0) -> torch.Tensor:
    """Random targets with at least one positive per image."""
    gen = torch.Generator().manual_seed(seed)
    targets = (torch.rand((batch, labels), generator=gen) < 0.4).float()
    targets[torch.arange(batch), torch.randint(labels, (batch,), generator=gen)] = 1.0
    return targets
