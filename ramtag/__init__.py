"""ramtag: open-vocabulary multi-label image tagging with RAM (Recover and Match)."""

__version__ = "0.1.0"

__all__ = ["__version__", "api", "load"]


def load(
    checkpoint=None,
    model: str = "ViT-B-16-quickgelu",
    pretrained: "str | None" = "openai",
    device: str = "auto",
    **overrides,
):
    """Load a ready-to-use tagger; see :func:`ramtag.api.load` (imported on first use: torch is heavy)."""
    from ramtag.api import load as _load

    return _load(checkpoint, model=model, pretrained=pretrained, device=device, **overrides)


def __getattr__(name: str):
    if name == "api":  # `import ramtag; ramtag.api.load(...)` works without importing torch up front
        import importlib

        return importlib.import_module("ramtag.api")
    raise AttributeError(f"module 'ramtag' has no attribute {name!r}")
