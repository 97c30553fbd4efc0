"""ramtag: open-vocabulary multi-label image tagging with RAM (Recover and Match)."""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(*args, **kwargs):
    """Load a ready-to-use tagger; see :func:`ramtag.api.load`."""
    from ramtag.api import load as _load

    return _load(*args, **kwargs)
