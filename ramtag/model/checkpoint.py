"""RAM checkpoints: ramtag's own format, and import of the reference implementation's files.

ramtag format: one safetensors file. Tensors: RAM's trained parts (adapters, tokens, prompts, temperatures)
and, when the backbone cannot be found by name (imported files), the backbone under `clip.`. Metadata:
`format = ramtag`, the ramtag version and the JSON `RamConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ramtag.atomic import write_safetensors
from ramtag.errors import CheckpointError
from ramtag.messages import listed
from ramtag.model.adapter import adapter_state_from_reference
from ramtag.model.config import Preprocessing, RamConfig
from ramtag.model.ram import RamModel
from ramtag.model.weights import load_backbone, openai_state_to_clip

FORMAT = "ramtag"
REFERENCE_TEMPLATE = "A photo of a {}."


def build_model(config: RamConfig, clip_model: nn.Module | None = None) -> RamModel:
    """A RAM model for `config`, loading its backbone by name unless one is given."""
    if clip_model is None:
        clip_model = load_backbone(config.backbone, config.pretrained)
    try:
        return RamModel(clip_model, config)
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def save_checkpoint(
    path: str | Path, model: RamModel, include_backbone: bool = False, extra: dict | None = None
) -> Path:
    """Write `model` atomically; include the backbone when it cannot be rebuilt from its name and tag."""
    from ramtag import __version__

    path = Path(path)
    tensors = model.state_dict() if include_backbone else model.trainable_state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "ramtag_version": __version__,
        "config": json.dumps(model.config.to_dict()),
        "includes_backbone": json.dumps(include_backbone),
        "extra": json.dumps(extra or {}),
    }
    if include_backbone:
        metadata["backbone_shape"] = json.dumps(backbone_shape(model.clip))
    write_safetensors(path, tensors, metadata)
    return path


def backbone_shape(clip_model: nn.Module) -> dict:
    """What an OpenAI-format rebuild cannot infer from tensor shapes alone (checked when one is rebuilt)."""
    from open_clip.transformer import QuickGELU

    vision_block = clip_model.visual.transformer.resblocks[0]
    text_tower = getattr(clip_model, "text", clip_model)
    return {
        "vision_heads": int(vision_block.attn.num_heads),
        "text_heads": int(text_tower.transformer.resblocks[0].attn.num_heads),
        "quick_gelu": isinstance(vision_block.mlp.gelu, QuickGELU),
    }


def load_checkpoint(
    path: str | Path, config_overrides: dict | None = None, clip_model: nn.Module | None = None
) -> RamModel:
    """Load a ramtag checkpoint or a reference-implementation `.pth` onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    # Returned in eval mode: in train mode the adapters' batch norms would use (and update) batch statistics.
    if _is_safetensors(path):
        return _load_ramtag_file(path, config_overrides, clip_model).eval()
    return _load_reference_file(path, config_overrides).eval()


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON.

    Its first byte is the length's low byte, so it cannot be told from a pickle's 0x80 by one byte (a header
    of 128 + 256k bytes starts like a pickle); the length must fit the file and the header must open with '{'.
    """
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_bytes = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + header_bytes <= path.stat().st_size


def _load_ramtag_file(path: Path, overrides: dict | None, clip_model: nn.Module | None) -> RamModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a ramtag checkpoint or a reference .pth ({error})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file without ramtag metadata (not a ramtag checkpoint)")
    try:
        data = json.loads(metadata["config"])
        data.update(overrides or {})
        config = RamConfig.from_dict(data)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: invalid ramtag config ({error})") from None
    backbone_state = {k[len("clip."):]: v for k, v in tensors.items() if k.startswith("clip.")}
    if backbone_state and clip_model is None:
        clip_model = openai_state_to_clip(backbone_state)
        recorded = json.loads(metadata.get("backbone_shape", "null"))
        if recorded is not None and recorded != backbone_shape(clip_model):
            raise CheckpointError(
                f"{path}: its backbone ({recorded}) cannot be rebuilt from tensor shapes alone "
                f"(a rebuild gives {backbone_shape(clip_model)}); save it without the backbone and load by "
                "architecture name"
            )
        # open_clip's OpenAI builder rounds to float16 on the way: restore the saved values exactly.
        clip_model.load_state_dict(backbone_state)
    model = build_model(config, clip_model)
    own = {k: v for k, v in tensors.items() if not k.startswith("clip.")}
    _load_strict(model, own, path)
    return model


def _load_strict(model: RamModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {listed(missing, 3, quote=False)}")
        if unexpected:
            detail.append(f"unexpected {listed(unexpected, 3, quote=False)}")
        raise CheckpointError(f"{path}: does not match the model ({'; '.join(detail)})")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


# -- reference implementation -----------------------------------------------------------------------------


def _load_reference_file(path: Path, overrides: dict | None) -> RamModel:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or pickled objects: both are refused the same way
        raise CheckpointError(
            f"{path}: cannot read as a weights-only torch file ({error.__class__.__name__})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    try:
        return model_from_reference_state(state, overrides)
    except (KeyError, CheckpointError) as error:
        raise CheckpointError(f"{path}: not a RAM reference checkpoint ({error})") from None


def _layers_with(state: dict[str, torch.Tensor], prefix: str, suffix: str) -> tuple[int, ...]:
    found = set()
    for key in state:
        if key.startswith(prefix) and suffix in key:
            found.add(int(key[len(prefix):].split(".")[0]))
    return tuple(sorted(found))


def model_from_reference_state(state: dict[str, torch.Tensor], overrides: dict | None = None) -> RamModel:
    """Build a RAM model from the reference's `RAM_Model.state_dict()` (its own backbone included).

    Architecture, adapter layers and token counts are inferred from the keys. Tokens and prompts are rounded
    to float16 as the reference does each time it uses them. The teacher copy is ignored (the teacher is the
    frozen backbone itself).
    """
    state = {k.removeprefix("module."): v.float() for k, v in state.items()}
    if "clip_model.visual.proj" not in state:
        raise CheckpointError("no clip_model.visual.proj tensor")
    clip_state, adapters, tokens, prompts = {}, {}, {}, {}
    vision_prefix = "clip_model.visual.transformer.resblocks."
    text_prefix = "clip_model.transformer.resblocks."
    for key, value in state.items():
        if not key.startswith("clip_model."):
            continue
        name = key[len("clip_model."):]
        if key.startswith(vision_prefix) and ".conv_adapter." in key:
            continue
        if key.startswith("clip_model.visual.attn."):
            # The reference keeps a second handle on its last replaced attention module: a duplicate.
            continue
        if key.startswith(vision_prefix) and key.endswith(".adapt_embeds"):
            tokens[int(key[len(vision_prefix):].split(".")[0])] = value
            continue
        if key.startswith(text_prefix) and key.endswith(".deep_embeds"):
            prompts[int(key[len(text_prefix):].split(".")[0])] = value
            continue
        name = name.replace(".attn.qkv.weight", ".attn.in_proj_weight").replace(".attn.qkv.bias", ".attn.in_proj_bias")
        clip_state[name] = value
    adapter_layers = _layers_with(state, vision_prefix, ".conv_adapter.")
    for layer in adapter_layers:
        adapters.update(
            {
                f"vision.adapters.{layer}.{k}": v
                for k, v in adapter_state_from_reference(f"{vision_prefix}{layer}.conv_adapter.", state).items()
            }
        )
    token_counts = {t.shape[0] for t in tokens.values()} or {0}
    prompt_counts = {p.shape[0] for p in prompts.values()} or {0}
    if len(token_counts) > 1 or len(prompt_counts) > 1:
        raise CheckpointError("adapter tokens or prompts differ in count between layers")
    clip_model = openai_state_to_clip(clip_state)
    image_size = int(clip_model.visual.image_size[0])
    config = RamConfig(
        backbone="reference-import",
        pretrained=None,
        adapter_layers=adapter_layers,
        adapter_tokens=token_counts.pop(),
        prompt_layers=tuple(sorted(prompts)),
        prompt_tokens=prompt_counts.pop(),
        temperature_loc=float(state.get("temperature_loc", torch.tensor(2e-3))),
        template=REFERENCE_TEMPLATE,
        trained=True,
        preprocessing=Preprocessing(
            image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash", interpolation="bilinear"
        ),
    )
    if overrides:
        config = RamConfig.from_dict({**config.to_dict(), **overrides})
    model = RamModel(clip_model, config)
    own = dict(adapters)
    own.update({f"vision.adapter_tokens.{i}": t.half().float() for i, t in tokens.items()})
    own.update({f"text.prompts.{i}": p.half().float() for i, p in prompts.items()})
    own["temperature"] = state["temperature"].reshape(())
    own["temperature_loc"] = state["temperature_loc"].reshape(())
    _load_strict(model, own, Path("<reference state dict>"))
    return model
