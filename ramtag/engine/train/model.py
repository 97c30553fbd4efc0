"""The model a training run starts from, its optimizer groups and its precision.

A fresh model (from `--model NAME --pretrained TAG|PATH`, `--model demo`, or a training-free `--init`
checkpoint) gets the reference's trained-mode settings: adapters and deep prompts at the backbone's last three
layers (9, 10, 11 on ViT-B/16), 8 adapter tokens, 4 prompt tokens, τ_loc = 2e-3, squash resize, mean = std = 0.5
(the demo model keeps the normalisation it was pretrained with). A trained `--init` checkpoint continues from
its own adapters, tokens, prompts and temperatures.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from ramtag.engine.runtime import KCOT_OPTIONS, Runtime
from ramtag.engine.train.config import TrainConfig
from ramtag.errors import UsageError
from ramtag.model.checkpoint import load_checkpoint
from ramtag.model.config import KcotConfig, Preprocessing, RamConfig
from ramtag.model.ram import RamModel
from ramtag.model.weights import DEMO_NAME, load_backbone, load_demo_clip

DEFAULT_TEMPLATE = "A photo of a {}."
DEFAULT_TEMPERATURE_LOC = 2e-3
REFERENCE_MEAN_STD = (0.5, 0.5, 0.5)


def _last_layers(depth: int, count: int = 3) -> tuple[int, ...]:
    return tuple(range(max(depth - count, 0), depth))


def _check_layers(name: str, layers: tuple[int, ...], depth: int) -> None:
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise UsageError(f"--{name.replace('_', '-')} {list(bad)}: the backbone has layers 0..{depth - 1}")


def _text_depth(clip: nn.Module) -> int:
    return len(getattr(clip, "text", clip).transformer.resblocks)


def _image_size(clip: nn.Module) -> int:
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _checkpoint_has_backbone(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as handle:
            return json.loads((handle.metadata() or {}).get("includes_backbone", "false"))
    except Exception:  # reference .pth files carry their backbone
        return True


def _fresh_config(
    config: TrainConfig,
    clip: nn.Module,
    backbone: str,
    pretrained: str | None,
    template: str,
    mean=REFERENCE_MEAN_STD,
    std=REFERENCE_MEAN_STD,
) -> RamConfig:
    vision_depth, text_depth = len(clip.visual.transformer.resblocks), _text_depth(clip)
    adapter_layers = tuple(config.adapter_layers) if config.adapter_layers is not None else _last_layers(vision_depth)
    prompt_layers = tuple(config.prompt_layers) if config.prompt_layers is not None else _last_layers(text_depth)
    _check_layers("adapter_layers", adapter_layers, vision_depth)
    _check_layers("prompt_layers", prompt_layers, text_depth)
    size = _image_size(clip)
    if config.image_size is not None and config.image_size != size:
        raise UsageError(f"--image-size {config.image_size}: the backbone takes {size}x{size} images")
    return RamConfig(
        backbone=backbone,
        pretrained=pretrained,
        adapter_layers=adapter_layers,
        adapter_tokens=config.adapter_tokens,
        prompt_layers=prompt_layers,
        prompt_tokens=config.prompt_tokens,
        temperature_loc=config.temperature_loc or DEFAULT_TEMPERATURE_LOC,
        template=template,
        trained=True,
        kcot=_kcot(config),
        preprocessing=Preprocessing(
            image_size=size, mean=tuple(mean), std=tuple(std), resize="squash", interpolation="bilinear"
        ),
    )


def _kcot(config: TrainConfig) -> KcotConfig:
    try:
        kcot = {field: getattr(config, option) for option, field in KCOT_OPTIONS.items()}
        return KcotConfig(teacher_weight=config.teacher_weight, **kcot)
    except ValueError as error:
        raise UsageError(str(error)) from None


def build_training_model(config: TrainConfig) -> tuple[RamModel, bool]:
    """The model to train and whether its checkpoints must carry the backbone (it cannot be found by name)."""
    if config.init is not None:
        if config.temperature_loc is not None:
            raise UsageError(
                "--temperature-loc sets a fresh model's initial value; --init continues from the checkpoint's"
            )
        loaded = load_checkpoint(config.init)
        include_backbone = _checkpoint_has_backbone(config.init)
        if not loaded.config.trained:
            old = loaded.config
            template = config.template or old.template
            fresh = _fresh_config(
                config,
                loaded.clip,
                old.backbone,
                old.pretrained,
                template,
                old.preprocessing.mean,
                old.preprocessing.std,
            )
            torch.manual_seed(config.seed)
            return RamModel(loaded.clip, fresh), include_backbone
        for name in ("adapter_layers", "prompt_layers"):
            wanted = getattr(config, name)
            saved = list(getattr(loaded.config, name))
            if wanted is not None and list(wanted) != saved:
                raise UsageError(f"--{name.replace('_', '-')} {wanted} differs from the --init checkpoint's {saved}")
        size = _image_size(loaded.clip)
        if config.image_size is not None and config.image_size != size:
            raise UsageError(f"--image-size {config.image_size}: the backbone takes {size}x{size} images")
        loaded.config.preprocessing.image_size = size  # the only size the backbone's position embedding allows
        if config.template is not None:
            loaded.config.template = config.template
        loaded.config.kcot = _kcot(config)
        return loaded, include_backbone
    if config.model == DEMO_NAME:
        clip, meta = load_demo_clip()
        template = config.template or meta.get("template", DEFAULT_TEMPLATE)
        ram_config = _fresh_config(
            config,
            clip,
            DEMO_NAME,
            None,
            template,
            meta.get("mean", REFERENCE_MEAN_STD),
            meta.get("std", REFERENCE_MEAN_STD),
        )
    else:
        clip = load_backbone(config.model, config.pretrained)
        ram_config = _fresh_config(config, clip, config.model, config.pretrained, config.template or DEFAULT_TEMPLATE)
    torch.manual_seed(config.seed)
    return RamModel(clip, ram_config), False


def label_tokens(
    model: RamModel, device: torch.device, seen: tuple[str, ...], unseen: tuple[str, ...], teacher: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The seen labels' prompt tokens and, with the teacher on, the frozen teacher's features of them (labels too
    long for the text encoder's context are refused, unseen ones too)."""
    import open_clip

    runtime = Runtime(model=model, device=device, fingerprint="training")
    runtime.check_label_lengths(seen, [model.config.template])
    if unseen:
        runtime.check_label_lengths(unseen, [model.config.template])
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.text.context_length)
    tokens = tokenizer([model.config.template.format(label) for label in seen]).to(device)
    if not teacher:
        return tokens, None
    with torch.no_grad():
        return tokens, model.encode_labels(tokens, use_prompts=False).float()


def parameter_groups(model: RamModel, config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(AdamW groups, SGD groups) as the reference splits them: temperatures, adapter weights; tokens."""
    temperatures, adapters, tokens = [], [], []
    for name, parameter in model.trainable_parameters().items():
        if name in ("temperature", "temperature_loc"):
            temperatures.append(parameter)
        elif name.startswith("vision.adapters."):
            adapters.append(parameter)
        elif name.startswith(("vision.adapter_tokens.", "text.prompts.")):
            tokens.append(parameter)
        else:
            raise RuntimeError(f"no optimizer group for trainable tensor {name}")
    # Each group's `lr` is its base rate: the schedule (ramtag.engine.train.schedule) multiplies it at every step.
    decay, token_decay = config.weight_decay, config.token_weight_decay
    adamw = [
        {"params": temperatures, "lr": config.lr, "weight_decay": decay, "name": "temperatures"},
        {"params": adapters, "lr": config.adapter_lr, "weight_decay": decay, "name": "adapters"},
    ]
    sgd = [{"params": tokens, "lr": config.token_lr, "weight_decay": token_decay, "name": "tokens"}]
    return [g for g in adamw if g["params"]], [g for g in sgd if g["params"]]
