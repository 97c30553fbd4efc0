"""A loaded RAM model with its tokenizer, device and fingerprint: what every command runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ramtag.data.vocab import check_label_lengths
from ramtag.engine.signals import stop_if_terminated
from ramtag.errors import UsageError
from ramtag.fingerprint import file_fingerprint, fingerprint
from ramtag.model.checkpoint import build_model, load_checkpoint
from ramtag.model.config import RamConfig
from ramtag.model.ram import RamModel, RamOutput
from ramtag.model.weights import DEMO_NAME, demo_asset_dir, load_demo_clip

DEFAULT_BACKBONE = "ViT-B-16-quickgelu"
DEFAULT_PRETRAINED = "openai"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device (auto, cpu, cuda, cuda:N)") from None


@dataclass
class Runtime:
    model: RamModel
    device: torch.device
    fingerprint: str
    """Identifies backbone weights, RAM weights, template and prompts: text features depend on all four."""
    source: dict = field(default_factory=dict)
    """How the model was loaded (for output metadata)."""
    _compiled: dict = field(default_factory=dict, repr=False)
    """batch size -> CompiledVision: a compiled forward serves every later run of this runtime at that size."""

    @property
    def config(self) -> RamConfig:
        return self.model.config

    def transform(self):
        """PIL image -> model input tensor, as this model's preprocessing settings say."""
        from ramtag.engine.preprocess import make_transform

        return make_transform(self.config.preprocessing)

    def tokenizer(self):
        import open_clip

        return open_clip.tokenizer.SimpleTokenizer(context_length=self.model.text.context_length)

    def templates(self, override: Sequence[str] | None = None) -> list[str]:
        if override:
            if self.config.trained and len(override) > 1:
                raise UsageError(
                    "template ensembles are for training-free models; a trained checkpoint uses its own template"
                )
            for template in override:
                if "{}" not in template:
                    raise UsageError(f"--template {template!r} has no {{}} where the label goes")
            return list(override)
        return [self.config.template]

    def check_label_lengths(
        self,
        labels: Sequence[str],
        templates: Sequence[str],
        line_numbers: Sequence[int] | None = None,
        source: str | None = None,
    ) -> None:
        """Refuse labels whose end-of-text token would fall past the prompted layers' context."""
        tokenizer = self.tokenizer()
        prompt_tokens = self.model.text.prompt_tokens if self.config.trained and self.model.text.prompts else 0

        def tokens(label: str) -> int:  # + start and end tokens, + the deep prompts inserted after the start token
            return max(len(tokenizer.encode(template.format(label))) for template in templates) + 2 + prompt_tokens

        counted = (
            f" with the template, start/end and {prompt_tokens} deep prompt tokens"
            if prompt_tokens
            else (" with the template and start/end tokens")
        )
        check_label_lengths(
            labels, line_numbers, tokens, self.model.text.context_length, source=source, counted=counted
        )

    @torch.inference_mode()
    def encode_labels(
        self, labels: Sequence[str], templates: Sequence[str] | None = None, batch_size: int = 256
    ) -> torch.Tensor:
        """Unnormalised label features [C, D] on the CPU, averaged over templates (normalised first) if several."""
        if not labels:
            raise ValueError("no labels to encode")
        templates = self.templates(templates)
        self.check_label_lengths(labels, templates)
        tokenizer = self.tokenizer()
        per_template = []
        for template in templates:
            chunks = []
            texts = [template.format(label) for label in labels]
            for start in range(0, len(texts), batch_size):
                tokens = tokenizer(texts[start : start + batch_size]).to(self.device)
                chunks.append(self.model.encode_labels(tokens).float().cpu())
            per_template.append(torch.cat(chunks))
        if len(per_template) == 1:
            return per_template[0]
        return torch.stack([F.normalize(f, dim=-1) for f in per_template]).mean(0)

    def vocabulary_fingerprint(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> str:
        return fingerprint({"model": self.fingerprint, "labels": list(labels), "templates": self.templates(templates)})

    def compiled_vision(self, batch_size: int, say: Callable[[str], None], backend: str = "inductor"):
        """The image forward compiled for batches of ``batch_size`` (see :mod:`ramtag.engine.compiled`), to pass
        to :meth:`score` as ``vision``; compiled once per size (with the first backend asked for), on the first
        batch it runs. ``say`` gets its one-line messages (how long compiling took, or the warning that it failed
        and the run goes on eager)."""
        from ramtag.engine.compiled import CompiledVision

        compiled = self._compiled.get(batch_size)
        if compiled is None:
            compiled = self._compiled[batch_size] = CompiledVision(self.model.vision, batch_size, say, backend)
        compiled.say = say
        return compiled

    def score(
        self,
        images: torch.Tensor,
        label_features: torch.Tensor,
        autocast_dtype: torch.dtype | None = None,
        vision: Callable | None = None,
    ) -> RamOutput:
        """RAM's scores for a batch; ``vision`` replaces the model's image forward (:meth:`compiled_vision`)."""
        size = self.config.preprocessing.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"images must be [B, 3, {size}, {size}], as transform() makes them; got {list(images.shape)}"
            )
        if label_features.ndim != 2 or label_features.shape[0] == 0:
            raise ValueError(f"label features must be [C, D] with at least one label; got {list(label_features.shape)}")
        images = images.to(self.device, non_blocking=True)
        features = label_features.to(self.device)
        try:
            with torch.inference_mode():
                if autocast_dtype is not None and self.device.type == "cuda":
                    with torch.autocast("cuda", dtype=autocast_dtype):
                        return self.model(images, features, vision=vision)
                return self.model(images, features, vision=vision)
        except torch.OutOfMemoryError as exc:
            raise DeviceMemoryError(self.device, len(images)) from exc


class DeviceMemoryError(UsageError):
    """The device ran out of memory for one batch: a setting to change (--batch-size), not a crash."""

    def __init__(self, device: torch.device, batch_size: int) -> None:
        smaller = max(1, batch_size // 2)
        super().__init__(
            f"{device} ran out of memory at {batch_size} images per batch; rerun with a smaller --batch-size "
            f"(e.g. -b {smaller}) and --resume to keep what is done"
        )


DEFAULT_BATCH_SIZES = {"cpu": 32, "cuda": 256}
"""Images per forward pass when --batch-size is not given: on CUDA a larger batch keeps the device busy."""


def default_batch_size(device: torch.device) -> int:
    return DEFAULT_BATCH_SIZES.get(device.type, DEFAULT_BATCH_SIZES["cpu"])


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""--precision values -> the autocast dtype (None: fp32); "auto" is resolved per device by :func:`autocast_dtype`."""
PRECISIONS = ("auto", *AUTOCAST_DTYPES)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device``, or None for fp32 (always on CPU).

    ``auto`` is bf16 where the CUDA device supports it, else fp16. bf16/fp16 asked for off CUDA is a usage error."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise UsageError(f"--precision {precision} needs CUDA; on {device.type} it runs in fp32")
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return AUTOCAST_DTYPES[precision]


KCOT_OPTIONS = {"ot_reg": "reg", "ot_max_iter": "max_iter", "ot_tol": "tol", "ot_stop": "stop"}
"""The CLI's KCOT option names (and the Python API's keywords) -> fields of the model's KCOT settings."""
MODEL_OPTIONS = ("scale_local_temperature", "local_temperature", "template", "temperature_loc")
DEMO_LOCAL_TEMPERATURE = "matched"
"""The demo model's local temperature rule (RamConfig.local_temperature); `fixed` everywhere else."""


def model_overrides(**options) -> dict:
    """`load_runtime`'s ``overrides`` from option names (``ot_reg=…``, ``scale_local_temperature=…``); None
    keeps the model's own setting."""
    unknown = sorted(set(options) - set(KCOT_OPTIONS) - set(MODEL_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown override(s) {', '.join(unknown)}; known: {', '.join([*KCOT_OPTIONS, *MODEL_OPTIONS])}"
        )
    overrides = {name: value for name, value in options.items() if name in MODEL_OPTIONS}
    overrides["kcot"] = {KCOT_OPTIONS[name]: value for name, value in options.items() if name in KCOT_OPTIONS}
    return overrides


def check_model_choice(checkpoint: str | Path | None, model: str, pretrained: str | None) -> None:
    """Refuse options that would be silently ignored, before anything loads: a checkpoint carries its own
    backbone and the demo model its own weights, so neither takes --pretrained (nor a checkpoint --model)."""
    given = pretrained not in (None, DEFAULT_PRETRAINED)
    if checkpoint is not None:
        if given:
            raise UsageError(
                f"--pretrained {pretrained} has no effect with --checkpoint, which carries its own backbone weights; "
                "drop one of them"
            )
        if model != DEFAULT_BACKBONE:
            raise UsageError(
                f"--model {model} has no effect with --checkpoint, which names its own architecture; drop --model"
            )
        return
    if model == DEMO_NAME and given:
        raise UsageError(
            f"--pretrained {pretrained} has no effect with --model demo, which brings its own weights; drop "
            "--pretrained, or name the open_clip architecture those weights are for with --model"
        )


def load_runtime(
    checkpoint: str | Path | None = None,
    model: str = DEFAULT_BACKBONE,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str = "auto",
    overrides: dict | None = None,
) -> Runtime:
    """Load a RAM checkpoint, or build training-free RAM around CLIP weights (`model` + `pretrained`)."""
    check_model_choice(checkpoint, model, pretrained)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    kcot_overrides = overrides.pop("kcot", None) or {}
    if checkpoint is not None:
        ram = load_checkpoint(checkpoint, config_overrides=overrides or None)
        source = {"checkpoint": str(checkpoint), "checkpoint_sha256_16": file_fingerprint(checkpoint)}
        backbone_id = {"backbone": ram.config.backbone, "pretrained": ram.config.pretrained}
    elif model == DEMO_NAME:
        clip, meta = load_demo_clip()
        # The demo's own rule: the reference's fixed τ_loc saturates its local branch on a few labels (one label
        # scored 1 on every image) and flattens it on a thousand; `matched` did better at every vocabulary size
        # measured (benchmarks/vocab_size.py). Other backbones keep the reference's rule unless asked.
        overrides.setdefault("local_temperature", DEMO_LOCAL_TEMPERATURE)
        config = RamConfig(
            backbone=DEMO_NAME,
            pretrained=None,
            template=meta.get("template", "a photo of a {}."),
            trained=False,
            preprocessing={
                "image_size": meta.get("image_size", 64),
                "mean": meta.get("mean", (0.5, 0.5, 0.5)),
                "std": meta.get("std", (0.5, 0.5, 0.5)),
                "resize": meta.get("resize", "squash"),
                "interpolation": meta.get("interpolation", "bilinear"),
            },
            adapter_layers=(),
            prompt_layers=(),
            **overrides,
        )
        ram = build_model(config, clip)
        source = {"model": DEMO_NAME}
        # The weights' own hash: a rebuilt demo must never reuse label features cached for the old one.
        backbone_id = {
            "backbone": DEMO_NAME,
            "weights_sha256_16": file_fingerprint(demo_asset_dir() / "demo-clip.safetensors"),
        }
    else:
        import open_clip

        config = RamConfig(
            backbone=model, pretrained=pretrained, trained=False, adapter_layers=(), prompt_layers=(), **overrides
        )
        ram = build_model(config)
        pre = open_clip.get_model_preprocess_cfg(ram.clip) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
        if pre:
            config.preprocessing.image_size = int(
                pre.get("size", config.preprocessing.image_size)
                if not isinstance(pre.get("size"), (tuple, list))
                else pre["size"][0]
            )
            config.preprocessing.mean = tuple(pre.get("mean", config.preprocessing.mean))
            config.preprocessing.std = tuple(pre.get("std", config.preprocessing.std))
        source = {"model": model, "pretrained": pretrained}
        backbone_id = dict(source)
        if pretrained and Path(pretrained).is_file():
            backbone_id["weights_sha256_16"] = file_fingerprint(pretrained)
    kcot_overrides = {key: value for key, value in kcot_overrides.items() if value is not None}
    if kcot_overrides:
        ram.config.kcot = dataclasses.replace(ram.config.kcot, **kcot_overrides)  # validated as a new KcotConfig
    torch_device = resolve_device(device)
    ram = ram.to(torch_device).eval()
    model_fingerprint = fingerprint(
        {
            **backbone_id,
            **{k: v for k, v in source.items() if k != "checkpoint"},
            "template": ram.config.template,
            "prompts": list(ram.config.prompt_layers),
            "trained": ram.config.trained,
        }
    )
    stop_if_terminated()  # a library import above may have swallowed the KeyboardInterrupt a SIGTERM raised
    return Runtime(model=ram, device=torch_device, fingerprint=model_fingerprint, source=source)
