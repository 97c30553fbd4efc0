"""The Python API: `ramtag.load(...)` returns a ready model that encodes labels and scores images."""

from __future__ import annotations

from ramtag.engine.runtime import Runtime, load_runtime


KCOT_OVERRIDES = {"ot_reg": "reg", "ot_max_iter": "max_iter", "ot_tol": "tol", "ot_stop": "stop"}
"""Keyword names of the CLI's KCOT options -> fields of the model's KCOT settings."""
MODEL_OVERRIDES = ("scale_local_temperature", "template", "temperature_loc")


def load(checkpoint=None, model: str = "ViT-B-16-quickgelu", pretrained: str | None = "openai", device: str = "auto", **overrides) -> Runtime:
    """Load RAM: a checkpoint (ramtag or reference `.pth`), or training-free RAM over open_clip weights.

    ``overrides``, as the CLI options of the same names: ``ot_reg``, ``ot_max_iter``, ``ot_tol``, ``ot_stop``
    (KCOT), ``scale_local_temperature``, ``template``, ``temperature_loc``.

    >>> tagger = ramtag.load(model="demo")
    >>> features = tagger.encode_labels(["red circle", "blue star"])
    >>> out = tagger.score(images, features)      # images: [B, 3, H, W] from tagger.transform()
    >>> out.scores, out.global_scores, out.local_scores, out.similarity, out.plan
    """
    unknown = sorted(set(overrides) - set(KCOT_OVERRIDES) - set(MODEL_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {', '.join(unknown)}; known: {', '.join([*KCOT_OVERRIDES, *MODEL_OVERRIDES])}")
    settings = {name: value for name, value in overrides.items() if name in MODEL_OVERRIDES}
    settings["kcot"] = {KCOT_OVERRIDES[name]: value for name, value in overrides.items() if name in KCOT_OVERRIDES}
    return load_runtime(checkpoint=checkpoint, model=model, pretrained=pretrained, device=device, overrides=settings)
