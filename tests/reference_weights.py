"""Deterministic random weights laid out like the reference RAM implementation's checkpoints.

The parity fixtures in ``tests/fixtures/parity`` hold only inputs and expected outputs: the weights they were
produced with are regenerated here from a seed, so the repository never stores a checkpoint. The state dict
has exactly the keys and shapes of the reference's whole ``RAM_Model.state_dict()`` (``clip_model.*``,
``clip_model_teacher.*``, ``temperature``, ``temperature_loc``) for a small CLIP-like backbone, written from
the checkpoint layout alone (no reference code).

Values are chosen so that a parity test exercises what matters: CLIP-like scales, non-zero biases,
non-trivial layer-norm affine parameters and batch-norm running statistics, and a logit scale of 100.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

# The reference computes the local (value-value) features of layer index 11 only, and its adapter and
# cross-attention text width are fixed at 512.
REFERENCE_LOCAL_LAYER = 11
REFERENCE_TEXT_DIM = 512
HEAD_WIDTH = 64
PARITY_DIR = Path(__file__).parent / "fixtures" / "parity"
PARITY_CASES = ("default", "custom")


@dataclass(frozen=True)
class ReferenceSpec:
    """Shape and initial values of a reference-layout RAM model."""

    embed_dim: int = 512
    """Joint image-text space; the reference hard-codes 512 for the adapter's cross-attention."""
    image_resolution: int = 32
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 12
    """The reference reads local features at layer index 11, so it needs exactly 12 layers here."""
    text_width: int = 128
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    adapter_layers: tuple[int, ...] = (9, 10, 11)
    """Vision layers (0-based) with a Ladder Local Adapter and adapter tokens."""
    text_prompt_layers: tuple[int, ...] = (9, 10, 11)
    """Text layers (0-based) that receive deep prompt tokens."""
    adapter_tokens: int = 8
    prompt_tokens: int = 4
    logit_scale: float = 100.0
    """exp of the backbone's stored logit scale."""
    temperature_loc: float = 2e-3
    temperature: float | None = None
    """Global temperature; None means 1 / logit_scale, the reference's initial value."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter_layers", tuple(int(i) for i in self.adapter_layers))
        object.__setattr__(self, "text_prompt_layers", tuple(int(i) for i in self.text_prompt_layers))
        if self.embed_dim != REFERENCE_TEXT_DIM:
            raise ValueError(f"embed_dim must be {REFERENCE_TEXT_DIM} (the reference's adapter text width)")
        if self.vision_layers != REFERENCE_LOCAL_LAYER + 1:
            raise ValueError(f"vision_layers must be {REFERENCE_LOCAL_LAYER + 1}: the reference reads layer 11")
        if self.image_resolution % self.patch_size:
            raise ValueError("image_resolution must be a multiple of patch_size")
        for name, width in (("vision_width", self.vision_width), ("text_width", self.text_width)):
            if width % HEAD_WIDTH:
                raise ValueError(f"{name} must be a multiple of {HEAD_WIDTH} (the reference's head width)")
        if any(not 0 <= i < self.vision_layers for i in self.adapter_layers):
            raise ValueError("adapter_layers out of range")
        if any(not 0 <= i < self.text_layers for i in self.text_prompt_layers):
            raise ValueError("text_prompt_layers out of range")
        if self.adapter_tokens < 1 or self.prompt_tokens < 1:
            raise ValueError("adapter_tokens and prompt_tokens must be positive")

    @property
    def grid_size(self) -> int:
        return self.image_resolution // self.patch_size

    @property
    def global_temperature(self) -> float:
        return 1.0 / self.logit_scale if self.temperature is None else self.temperature

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceSpec:
        return spec_from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return spec_to_dict(self)


def spec_to_dict(spec: ReferenceSpec) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(spec).items()}


def spec_from_dict(data: dict[str, Any]) -> ReferenceSpec:
    """Inverse of :func:`spec_to_dict`; unknown keys are an error so a stale fixture fails loudly."""
    known = {f.name for f in fields(ReferenceSpec)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown ReferenceSpec fields: {sorted(unknown)}")
    return ReferenceSpec(**{key: tuple(v) if isinstance(v, list) else v for key, v in data.items()})


def round_to_fp16(tensor: torch.Tensor) -> torch.Tensor:
    """fp32 tensor holding the nearest fp16 values (what the reference's fp16 load leaves behind)."""
    return tensor.half().float()


class _Draw:
    """Seeded draws; every tensor comes from one generator in a fixed key order."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen) * std + mean

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen) * (high - low) + low


def _layer_norm(draw: _Draw, prefix: str, width: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": draw.normal((width,), 0.1, mean=1.0), f"{prefix}.bias": draw.normal((width,), 0.05)}


def _residual_block(draw: _Draw, prefix: str, width: int, layers: int, vision: bool) -> dict[str, torch.Tensor]:
    """One CLIP residual block; vision blocks carry the renamed value-value attention (`attn.qkv`)."""
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    qkv = "attn.qkv.weight" if vision else "attn.in_proj_weight"
    qkv_bias = "attn.qkv.bias" if vision else "attn.in_proj_bias"
    out = {
        f"{prefix}.{qkv}": draw.normal((3 * width, width), attn_std),
        f"{prefix}.{qkv_bias}": draw.normal((3 * width,), 0.02),
        f"{prefix}.attn.out_proj.weight": draw.normal((width, width), proj_std),
        f"{prefix}.attn.out_proj.bias": draw.normal((width,), 0.02),
    }
    out |= _layer_norm(draw, f"{prefix}.ln_1", width)
    out |= {
        f"{prefix}.mlp.c_fc.weight": draw.normal((4 * width, width), fc_std),
        f"{prefix}.mlp.c_fc.bias": draw.normal((4 * width,), 0.02),
        f"{prefix}.mlp.c_proj.weight": draw.normal((width, 4 * width), proj_std),
        f"{prefix}.mlp.c_proj.bias": draw.normal((width,), 0.02),
    }
    out |= _layer_norm(draw, f"{prefix}.ln_2", width)
    return out


def _backbone(draw: _Draw, spec: ReferenceSpec) -> dict[str, torch.Tensor]:
    """The frozen CLIP weights (no adapters, no tokens), already rounded to fp16 values."""
    vw, tw = spec.vision_width, spec.text_width
    scale = vw**-0.5
    sd: dict[str, torch.Tensor] = {
        "positional_embedding": draw.normal((spec.context_length, tw), 0.01),
        "text_projection": draw.normal((tw, spec.embed_dim), tw**-0.5),
        "visual.class_embedding": draw.normal((vw,), scale),
        "visual.positional_embedding": draw.normal((spec.grid_size**2 + 1, vw), scale),
        "visual.proj": draw.normal((vw, spec.embed_dim), scale),
        "visual.conv1.weight": draw.normal((vw, 3, spec.patch_size, spec.patch_size), (3 * spec.patch_size**2) ** -0.5),
    }
    sd |= _layer_norm(draw, "visual.ln_pre", vw)
    for i in range(spec.vision_layers):
        sd |= _residual_block(draw, f"visual.transformer.resblocks.{i}", vw, spec.vision_layers, vision=True)
    sd |= _layer_norm(draw, "visual.ln_post", vw)
    for i in range(spec.text_layers):
        sd |= _residual_block(draw, f"transformer.resblocks.{i}", tw, spec.text_layers, vision=False)
    sd["token_embedding.weight"] = draw.normal((spec.vocab_size, tw), 0.02)
    sd |= _layer_norm(draw, "ln_final", tw)
    sd = {key: round_to_fp16(value) for key, value in sd.items()}
    # Kept in fp32 like the reference (its fp16 conversion skips the logit scale), so exp() gives the spec's value.
    sd["logit_scale"] = torch.tensor(math.log(spec.logit_scale), dtype=torch.float32)
    # The reference keeps its last replaced attention also as `visual.attn` (the same module object).
    last = f"visual.transformer.resblocks.{spec.vision_layers - 1}.attn"
    for name in ("qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias"):
        sd[f"visual.attn.{name}"] = sd[f"{last}.{name}"].clone()
    return sd


def _batch_norm(draw: _Draw, prefix: str, channels: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": draw.normal((channels,), 0.1, mean=1.0),
        f"{prefix}.bias": draw.normal((channels,), 0.1),
        f"{prefix}.running_mean": draw.normal((channels,), 0.1),
        f"{prefix}.running_var": draw.uniform((channels,), 0.5, 1.5),
        f"{prefix}.num_batches_tracked": torch.tensor(1000, dtype=torch.int64),
    }


def _local_adapter(draw: _Draw, prefix: str, width: int) -> dict[str, torch.Tensor]:
    hidden = REFERENCE_TEXT_DIM
    sd = {f"{prefix}.conv_adapter_layers1.0.weight": draw.normal((hidden, width, 1, 1), width**-0.5)}
    sd |= _batch_norm(draw, f"{prefix}.conv_adapter_layers1.1", hidden)
    sd[f"{prefix}.conv_adapter_layers2.0.weight"] = draw.normal((hidden, width, 3, 3), (9 * width) ** -0.5)
    sd |= _batch_norm(draw, f"{prefix}.conv_adapter_layers2.1", hidden)
    sd[f"{prefix}.conv_adapter_layers.weight"] = draw.normal((2, 2, 3, 3), 0.3)
    sd[f"{prefix}.conv_adapter_final.weight"] = draw.normal((width, hidden, 1, 1), hidden**-0.5)
    for norm in ("adapter_norm_q1", "adapter_norm_q2", "adapter_norm_kv"):
        sd |= _layer_norm(draw, f"{prefix}.{norm}", hidden)
    return sd


def _trainable(draw: _Draw, spec: ReferenceSpec) -> dict[str, torch.Tensor]:
    """Adapters and learnable tokens; the tokens hold fp16 values since the reference rounds them on use."""
    sd: dict[str, torch.Tensor] = {}
    for i in spec.adapter_layers:
        block = f"visual.transformer.resblocks.{i}"
        sd[f"{block}.adapt_embeds"] = round_to_fp16(draw.normal((spec.adapter_tokens, spec.vision_width), 0.05))
        sd |= _local_adapter(draw, f"{block}.conv_adapter", spec.vision_width)
    for i in spec.text_prompt_layers:
        sd[f"transformer.resblocks.{i}.deep_embeds"] = round_to_fp16(
            draw.normal((spec.prompt_tokens, spec.text_width), 0.05)
        )
    return sd


def make_reference_state_dict(spec: ReferenceSpec, seed: int) -> dict[str, torch.Tensor]:
    """State dict with the keys and shapes of the reference's whole ``RAM_Model.state_dict()``.

    The student (``clip_model.*``) and the teacher (``clip_model_teacher.*``) share the same backbone values,
    as in the reference, where both are loaded from the same CLIP weights.
    """
    draw = _Draw(seed)
    backbone = _backbone(draw, spec)
    trainable = _trainable(draw, spec)
    state: dict[str, torch.Tensor] = {}
    for key, value in (backbone | trainable).items():
        state[f"clip_model.{key}"] = value
    for key, value in backbone.items():
        state[f"clip_model_teacher.{key}"] = value.clone()
    state["temperature_loc"] = torch.tensor(spec.temperature_loc, dtype=torch.float32)
    state["temperature"] = torch.tensor(spec.global_temperature, dtype=torch.float32)
    return state


def make_reference_images(spec: ReferenceSpec, batch: int, seed: int) -> torch.Tensor:
    """Input batch [batch, 3, R, R] uniform in [-1, 1], the range of images normalised with mean = std = 0.5."""
    gen = torch.Generator().manual_seed(seed)
    size = (batch, 3, spec.image_resolution, spec.image_resolution)
    return torch.rand(size, generator=gen) * 2.0 - 1.0


def load_parity_fixture(name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, expected tensors) of one reference-parity case; see tests/fixtures/parity/README.md."""
    meta = json.loads((PARITY_DIR / f"{name}.json").read_text())
    return meta, load_file(PARITY_DIR / f"{name}.safetensors")
