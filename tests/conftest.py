"""Session-wide fixtures: a tiny RAM checkpoint that carries its own backbone, and a private cache dir."""

from __future__ import annotations

import pytest
import torch

# The evaluation modules' shared bench, model and evaluation (session-scoped: built once, when first asked for).
from tests.eval_fixtures import bench, evaluated, runtime  # noqa: F401

# Tiny models are dominated by thread hand-offs: one thread is faster, and steady on a shared machine.
torch.set_num_threads(1)


def build_tiny_checkpoint(path, trained: bool = True, seed: int = 0):
    """A RAM model over a tiny OpenAI-shaped CLIP (heads = width // 64), saved with its backbone."""
    import open_clip

    from ramtag.model.checkpoint import save_checkpoint
    from ramtag.model.config import Preprocessing, RamConfig
    from ramtag.model.ram import RamModel

    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
        quick_gelu=True,
    )
    config = RamConfig(
        backbone="tiny-test",
        pretrained=None,
        adapter_layers=(1,) if trained else (),
        prompt_layers=(1,) if trained else (),
        adapter_tokens=2,
        prompt_tokens=2,
        trained=trained,
        template="a photo of a {}.",
        preprocessing=Preprocessing(image_size=32),
    )
    model = RamModel(clip, config)
    save_checkpoint(path, model, include_backbone=True)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep the label-feature cache of every test away from the user's cache."""
    monkeypatch.setenv("RAMTAG_CACHE_DIR", str(tmp_path / "ramtag-cache"))
