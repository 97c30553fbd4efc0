"""The Python API: `ramtag.load(...)` returns a ready model that encodes labels and scores images."""

from __future__ import annotations

from ramtag.engine.runtime import Runtime, load_runtime


def load(checkpoint=None, model: str = "ViT-B-16-quickgelu", pretrained: str | None = "openai", device: str = "auto", **overrides) -> Runtime:
    """Load RAM: a checkpoint (ramtag or reference `.pth`), or training-free RAM over open_clip weights.

    >>> tagger = ramtag.load(model="demo")
    >>> features = tagger.encode_labels(["red circle", "blue star"])
    >>> out = tagger.score(images, features)      # images: [B, 3, H, W], preprocessed
    >>> out.scores, out.global_scores, out.local_scores, out.similarity, out.plan
    """
    return load_runtime(checkpoint=checkpoint, model=model, pretrained=pretrained, device=device, overrides=overrides)
