"""Where backbone weights come from: open_clip names and pretrained tags, local files, the bundled demo CLIP."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import warnings
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ramtag.errors import CheckpointError
from ramtag.model.hub import hub_address, hub_offline, hub_reachable, offline_choices

DEMO_NAME = "demo"


def demo_asset_dir() -> Path:
    """The bundled demo model; RAMTAG_DEMO_DIR points elsewhere (a rebuilt or candidate demo model)."""
    override = os.environ.get("RAMTAG_DEMO_DIR")
    return Path(override) if override else Path(str(resources.files("ramtag") / "assets" / "demo"))


def load_demo_clip() -> tuple[nn.Module, dict]:
    """The bundled small CLIP (pretrained on ramtag's synthetic scenes) and its metadata."""
    import open_clip
    from safetensors.torch import load_file

    folder = demo_asset_dir()
    config_path, weights_path = folder / "demo-clip.json", folder / "demo-clip.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"the bundled demo model is missing from {folder}; reinstall ramtag")
    meta = json.loads(config_path.read_text())
    model = open_clip.model.CLIP(**meta["open_clip_config"])
    state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def openai_state_to_clip(state: dict[str, torch.Tensor]) -> nn.Module:
    """Build an open_clip CLIP (QuickGELU, float32) from an OpenAI-format state dict, inferring its shape."""
    import open_clip

    try:
        model = open_clip.model.build_model_from_openai_state_dict(dict(state), quick_gelu=True)
    except (KeyError, RuntimeError, IndexError) as error:
        raise CheckpointError(f"not an OpenAI-format CLIP state dict: {error}") from None
    return model.float().eval()


def load_backbone(name: str, pretrained: str | None) -> nn.Module:
    """An open_clip CLIP by architecture name plus a pretrained tag or a local weights file.

    Local files may be open_clip state dicts or OpenAI-format files (state dict or TorchScript archive).
    Tags such as `openai` download through open_clip (and its cache) where the machine has network.
    """
    import open_clip

    if name == DEMO_NAME:
        return load_demo_clip()[0]
    if name not in open_clip.list_models():
        raise CheckpointError(
            f"unknown open_clip architecture {name!r}; see `python -c 'import open_clip; "
            "print(open_clip.list_models())'`"
        )
    if pretrained and os.path.sep in pretrained or (pretrained and Path(pretrained).is_file()):
        return _load_local_weights(name, Path(pretrained))
    offline = bool(pretrained) and not hub_reachable()
    if offline:
        cached_weights(name, pretrained)  # fails now, before a large model is built for weights that cannot come
    try:
        with logs_held_unless_it_fails(), hub_offline(offline):
            model = open_clip.create_model(name, pretrained=pretrained or None, precision="fp32", device="cpu")
    except (RuntimeError, OSError) as error:
        message = str(error).lower()
        if isinstance(error, OSError) or "download" in message or "connection" in message:
            raise CheckpointError(
                f"cannot download {name} weights ({pretrained}): no network? {offline_choices(name, pretrained)}"
            ) from None
        if "pretrained" in message or "tag" in message:
            raise CheckpointError(f"{name}: {str(error).splitlines()[0]}") from None
        raise
    return model.eval()


def cached_weights(name: str, tag: str, cache_dir: str | None = None) -> str:
    """The path of `name`/`tag` weights already downloaded (hub or URL cache); without them, a one-line
    :class:`CheckpointError` naming the offline choices. Makes no network request."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, has_hf_hub

    config = get_pretrained_cfg(name, tag)
    if not config:
        raise CheckpointError(f"open_clip knows no pretrained tag {tag!r} for {name}; see open_clip.list_pretrained()")
    host, port = hub_address()
    missing = CheckpointError(
        f"cannot download {name} weights ({tag}): no network ({host}:{port} cannot be reached) and they are not "
        f"in the download cache; {offline_choices(name, tag)}"
    )
    if config.get("hf_hub") and has_hf_hub():
        try:
            with logs_held_unless_it_fails(), hub_offline():
                return download_pretrained(config, cache_dir=cache_dir)
        except Exception:  # offline, any failure means "not in the cache"
            raise missing from None
    url = config.get("url", "")
    cached = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
    if url and cached.is_file():
        return str(cached)
    raise missing


@contextmanager
def logs_held_unless_it_fails() -> Iterator[None]:
    """Hold what open_clip and huggingface_hub log while loading; pass it on if loading succeeds.

    Without network, huggingface_hub logs every retry (about 50 lines, each twice) before open_clip gives up; the
    failure is then reported as one line, so the held records are dropped. On success they are replayed.
    """
    # No level and no count flushes early: only a successful load hands the records on.
    hold = logging.handlers.MemoryHandler(capacity=sys.maxsize, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers = [hold]
    loggers[1].propagate = False  # held once, not again through the root logger
    failed = True
    try:
        yield
        failed = False
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        if not failed:
            hold.setTarget(_ToOwnLogger())
            hold.flush()
        hold.close()


class _ToOwnLogger(logging.Handler):
    """Hands a held record to the logger that made it, now that its own handlers are back."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _load_local_weights(name: str, path: Path) -> nn.Module:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    # Each format is tried in turn; torch warns while probing (TorchScript deprecation, pickle protocol), which
    # says nothing about the outcome: the file loads, or one CheckpointError line says why not.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _probe_local_weights(name, path)


def _probe_local_weights(name: str, path: Path) -> nn.Module:
    import open_clip

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        state = None
    if isinstance(state, dict):
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if "visual.proj" in state and "visual.transformer.resblocks.0.attn.in_proj_weight" in state:
            model = open_clip.create_model(name, pretrained=None, precision="fp32", device="cpu")
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError:
                return openai_state_to_clip(state)
            return model.eval()
    try:
        # TorchScript archives of OpenAI CLIP: open_clip reads them without unpickling Python objects.
        return open_clip.load_openai_model(str(path), precision="fp32", device="cpu").eval()
    except Exception as error:  # any failure here means the file is not usable weights
        raise CheckpointError(f"{path}: not CLIP weights that {name} can load ({error.__class__.__name__})") from None
