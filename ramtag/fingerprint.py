"""The one fingerprint of ramtag: what caches, resumed runs, thresholds files and checkpoints record to tell
whether two things are the same (a model, a vocabulary, a run's settings, a file's bytes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

LENGTH = 16
"""Hex digits kept: 64 bits, ample to tell apart the models and vocabularies one user has."""


def fingerprint(*parts: Any, length: int = LENGTH) -> str:
    """A sha256 fingerprint of ``parts`` (str, bytes, numbers, JSON-able values, tensors).

    Each part is type-tagged and length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` differ; dicts are
    hashed with sorted keys, so their order does not matter.
    """
    digest = hashlib.sha256()
    for part in parts:
        tag, payload = _encoded(part)
        digest.update(tag + b":" + str(len(payload)).encode() + b":" + payload)
    return digest.hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    """The full sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """A file's sha256, shortened to :data:`LENGTH`: what fingerprints of models and vocabularies record."""
    return file_sha256(path)[:LENGTH]


def _encoded(part: Any) -> tuple[bytes, bytes]:
    if isinstance(part, bytes):
        return b"b", part
    if isinstance(part, str):
        return b"s", part.encode("utf-8")
    if type(part).__module__ == "torch" and type(part).__name__ in ("Tensor", "Parameter"):
        # torch is imported only by whoever already holds a tensor; data-layer callers stay torch-free.
        tensor = part.detach().cpu().contiguous()
        tag = f"t{tensor.dtype}{tuple(tensor.shape)}".encode()
        import torch

        return tag, tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return b"j", json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
