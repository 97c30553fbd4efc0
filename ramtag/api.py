"""The Python API: `ramtag.load(...)` returns a ready model that encodes labels and scores images."""

from __future__ import annotations

from ramtag.engine.runtime import Runtime, load_runtime, model_overrides


def load(
    checkpoint=None,
    model: str = "ViT-B-16-quickgelu",
    pretrained: str | None = "openai",
    device: str = "auto",
    **overrides,
) -> Runtime:
    """Load RAM: a checkpoint (ramtag or reference `.pth`), or training-free RAM over open_clip weights.

    ``overrides``, as the CLI options of the same names: ``ot_reg``, ``ot_max_iter``, ``ot_tol``, ``ot_stop``
    (KCOT), ``scale_local_temperature``, ``local_temperature``, ``template``, ``temperature_loc``.

    >>> tagger = ramtag.load(model="demo")
    >>> features = tagger.encode_labels(["red circle", "blue star"])
    >>> out = tagger.score(images, features)      # images: [B, 3, H, W] from tagger.transform()
    >>> out.scores, out.global_scores, out.local_scores, out.similarity, out.plan
    """
    return load_runtime(
        checkpoint=checkpoint, model=model, pretrained=pretrained, device=device, overrides=model_overrides(**overrides)
    )
