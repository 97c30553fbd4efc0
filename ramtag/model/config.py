"""Settings of a RAM model, stored in ramtag checkpoints as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ramtag.model.kcot import STOP_RULES, STOP_SCOPES

LOCAL_TEMPERATURES = ("fixed", "matched")
"""Rules for the local branch's temperature (RamConfig.local_temperature)."""


@dataclass
class KcotConfig:
    reg: float = 0.1
    """Entropic regularisation at inference (the reference's OT_REG)."""
    teacher_weight: float = 0.05
    """Weight of the teacher's -log P term in training; also added to `reg` while training (OT_REGSC)."""
    max_iter: int = 100
    tol: float = 1e-3
    stop: str = "reference"
    """`reference` (parity) or `marginal`; see ramtag.model.kcot.sinkhorn."""
    stop_scope: str = "per_image"
    """`per_image`: each image stops when its own rule holds, so its scores do not depend on its batch mates;
    `batch`: every image iterates until the rule holds for the whole batch (the reference's stop, for parity
    with outputs it produced on a batch)."""
    presence_temperature: float = 0.1
    """Temperature of the region marginal (label presence detection)."""
    teacher_sharpness: float = 20.0

    def __post_init__(self) -> None:
        if self.reg <= 0:
            raise ValueError("KCOT reg must be positive")
        if self.max_iter < 1:
            raise ValueError("KCOT max_iter must be at least 1")
        if self.tol <= 0:
            raise ValueError("KCOT tol must be positive")
        if self.stop not in STOP_RULES:
            raise ValueError(f"KCOT stop must be one of {', '.join(STOP_RULES)}, not {self.stop!r}")
        if self.stop_scope not in STOP_SCOPES:
            raise ValueError(f"KCOT stop_scope must be one of {', '.join(STOP_SCOPES)}, not {self.stop_scope!r}")


@dataclass
class Preprocessing:
    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "squash"
    """`squash` (resize to a square, aspect not kept: the reference) or `center-crop` (open_clip's default)."""
    interpolation: str = "bilinear"


@dataclass
class RamConfig:
    """Everything needed to rebuild a RAM model around its backbone."""

    backbone: str = "ViT-B-16-quickgelu"
    """open_clip architecture name, or `demo` for the bundled demo CLIP."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag or a local weights file; None when the checkpoint carries its own backbone."""
    adapter_layers: tuple[int, ...] = (9, 10, 11)
    adapter_tokens: int = 8
    prompt_layers: tuple[int, ...] = (9, 10, 11)
    prompt_tokens: int = 4
    temperature_loc: float = 2e-3
    temperature: float | None = None
    """Initial global temperature; None means 1 / the backbone's logit scale."""
    train_vocabulary_size: int | None = None
    """Number of labels the adapter was trained on; used by the vocabulary-scaled local temperature."""
    scale_local_temperature: bool = False
    """Use τ_loc · C_train / C (off by default: the reference does not)."""
    local_temperature: str = "fixed"
    """`fixed`: τ_loc as stored (the reference; the local logits scale with 1/(C·τ_loc), so a few labels saturate
    the local softmax and a thousand flatten it); `matched`: 4·τ_g / C, so that the local logit, the
    transport-weighted mean cosine over 4·τ_g, keeps one scale tied to the global branch's whatever the vocabulary
    size C (ramtag.model.ram.MATCHED_LOCAL_FACTOR). `matched` supersedes `scale_local_temperature`."""
    template: str = "A photo of a {}."
    trained: bool = False
    """False: training-free RAM (value-value path and KCOT, no adapter, tokens or prompts are used)."""
    kcot: KcotConfig = field(default_factory=KcotConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __post_init__(self) -> None:
        self.adapter_layers = tuple(sorted(int(i) for i in self.adapter_layers))
        self.prompt_layers = tuple(sorted(int(i) for i in self.prompt_layers))
        if isinstance(self.kcot, dict):
            self.kcot = KcotConfig(**self.kcot)
        if isinstance(self.preprocessing, dict):
            pre = dict(self.preprocessing)
            pre["mean"] = tuple(pre.get("mean", (0.5, 0.5, 0.5)))
            pre["std"] = tuple(pre.get("std", (0.5, 0.5, 0.5)))
            self.preprocessing = Preprocessing(**pre)
        if "{}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} has no {{}} for the label")
        if self.local_temperature not in LOCAL_TEMPERATURES:
            raise ValueError(
                f"local temperature must be one of {', '.join(LOCAL_TEMPERATURES)}, not {self.local_temperature!r}"
            )
        if self.adapter_tokens < 0 or self.prompt_tokens < 0:
            raise ValueError("token counts cannot be negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RamConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RAM config fields: {', '.join(sorted(unknown))}")
        return cls(**data)
