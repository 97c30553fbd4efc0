"""Atomic file writes: a temporary file in the target's folder, renamed over the target when complete."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path next to ``path`` to write; on success it becomes ``path`` with the mode any new
    file gets under the user's umask (mkstemp and safetensors create files 0600), on failure it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        yield temporary
        os.chmod(temporary, _default_mode())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any, *, allow_nan: bool = True) -> None:
    """Write ``data`` as indented JSON (non-ASCII kept, unknown types as ``str``) to ``path`` atomically.

    ``allow_nan=False`` refuses NaN and infinities, for reports that strict JSON readers must open."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str, allow_nan=allow_nan) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically.

    The file is serialised in memory and written with Python's own file IO, so a full disk or quota is an OSError
    with its errno (safetensors' file writer raises a SafetensorError that carries it only in its text). The copy
    in memory is what the tensors already take: a few hundred MB for a checkpoint that includes its backbone."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        stream.write(data)
