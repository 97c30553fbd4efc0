"""Vocabulary files, label text-feature files (``.rtv``) and their cache.

A label file is UTF-8 text, one label per line; lines starting with ``#`` and blank lines are
ignored, surrounding whitespace is stripped (a ``#`` inside a label is kept: ``C#``). Labels
that differ only in case or inner spacing count as duplicates: CLIP's tokenizer reads them
identically, and a duplicate would split its score between two rows.

A ``.rtv`` file is safetensors with one tensor, ``text_features`` (float32 ``[C, D]``,
unnormalised), and a ``ramtag`` metadata entry holding JSON: labels, templates, fingerprint
(model, checkpoint, templates) and the ramtag version.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from ramtag.atomic import write_safetensors
from ramtag.errors import VocabularyError
from ramtag.messages import clipped

FEATURES_TENSOR = "text_features"
METADATA_ENTRY = "ramtag"
FEATURE_SUFFIX = ".rtv"
_SAFE_FINGERPRINT = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass
class LabelFile:
    """Labels in file order and the 1-based line each came from."""

    labels: list[str]
    line_numbers: list[int]


def _normalised(label: str) -> str:
    return " ".join(label.split()).casefold()


def _looks_like_safetensors(raw: bytes) -> bool:
    """A safetensors file (what .rtv files are) starts with its header's size as 8 little-endian bytes, then '{'."""
    return len(raw) > 8 and raw[5:8] == b"\0\0\0" and raw[8:9] == b"{"


def read_labels(source: str | os.PathLike | TextIO) -> LabelFile:
    """Read a label file (a path, or an open text stream such as stdin); see the module docstring."""
    name = getattr(source, "name", None) or "labels"
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        try:
            raw = Path(source).read_bytes()
        except FileNotFoundError as exc:
            raise VocabularyError(f"{name}: no such label file") from exc
        except IsADirectoryError as exc:
            raise VocabularyError(f"{name}: a folder, not a label file") from exc
        except OSError as exc:
            raise VocabularyError(f"{name}: cannot read ({exc.strerror or exc})") from exc
        if _looks_like_safetensors(raw):
            raise VocabularyError(
                f"{name}: an encoded vocabulary (.rtv); this option needs the text label file it was encoded from"
            )
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise VocabularyError(f"{name}:{line}: not UTF-8 text") from exc
    else:
        text = source.read()
    labels: list[str] = []
    line_numbers: list[int] = []
    first_seen: dict[str, int] = {}
    # Lines end at \n (and \r\n) only: str.splitlines would also split a label at U+2028 and other separators.
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        label = line.strip()
        if not label or label.startswith("#"):
            continue
        folded = _normalised(label)
        if folded in first_seen:
            earlier = first_seen[folded]
            same = labels[line_numbers.index(earlier)] == label
            detail = "" if same else " (they differ only in case or spacing, which the text encoder ignores)"
            raise VocabularyError(f"{name}:{number}: label {clipped(repr(label))} duplicates line {earlier}{detail}")
        first_seen[folded] = number
        labels.append(label)
        line_numbers.append(number)
    if not labels:
        raise VocabularyError(f"{name}: the vocabulary is empty (no labels, only comments or blank lines)")
    return LabelFile(labels, line_numbers)


MAX_CHARACTERS_PER_TOKEN = 64
"""No text token spans more characters: open_clip's longest BPE token is 32 bytes (8 emoji), a word piece is
shorter. A label with more than ``max_tokens`` times this many characters cannot fit, without tokenizing it."""


def check_label_lengths(
    labels: Sequence[str],
    line_numbers: Sequence[int] | None,
    token_count_fn: Callable[[str], int],
    max_tokens: int,
    *,
    source: str | None = None,
    counted: str = "",
) -> None:
    """Raise :class:`VocabularyError` naming the first label whose token count exceeds ``max_tokens``.

    ``token_count_fn`` counts what the text encoder will see for a label (template, start, end
    and deep prompt tokens included); the engine supplies it from the tokenizer. ``counted`` says
    what that count includes, for the message. The error names ``source:line`` where line numbers
    are given (``labels:line`` without a source), else ``source``.
    """
    for index, label in enumerate(labels):
        if line_numbers is not None:
            where = f"{source or 'labels'}:{line_numbers[index]}: "
        else:
            where = f"{source}: " if source else ""
        if len(label) > max_tokens * MAX_CHARACTERS_PER_TOKEN:  # tokenizing 10 MB took a minute and 1.5 GB
            raise VocabularyError(
                f"{where}label {clipped(repr(label), 60)} is too long for the text encoder "
                f"({len(label):,} characters; at most {max_tokens} tokens fit)"
            )
        count = token_count_fn(label)
        if count > max_tokens:
            raise VocabularyError(
                f"{where}label {clipped(repr(label))} is too long for the text encoder ({count} tokens{counted}, "
                f"at most {max_tokens} fit)"
            )


# ---------------------------------------------------------------------------------------------
# Feature files


@dataclass
class VocabFeatures:
    """Label text features with what they were computed from."""

    features: torch.Tensor
    labels: list[str]
    templates: list[str]
    fingerprint: dict[str, Any]
    version: str
    metadata: dict[str, Any] = field(default_factory=dict)


def save_vocab_features(
    path: str | os.PathLike,
    features: torch.Tensor,
    labels: Sequence[str],
    metadata: Mapping[str, Any],
) -> Path:
    """Write a ``.rtv`` file atomically.

    ``metadata`` needs ``templates`` and ``fingerprint`` (a dict: model, checkpoint, templates);
    ``version`` defaults to this ramtag's. Other entries are kept as they are.
    """
    from ramtag import __version__

    features = features.detach().to("cpu", torch.float32).contiguous()
    if features.ndim != 2 or features.shape[0] != len(labels):
        raise VocabularyError(f"features of shape {tuple(features.shape)} do not fit {len(labels)} labels")
    missing = [name for name in ("templates", "fingerprint") if name not in metadata]
    if missing:
        raise ValueError(f"vocabulary metadata lacks {', '.join(missing)}")
    payload = {"version": __version__, **dict(metadata), "labels": list(labels)}
    target = Path(path)
    write_safetensors(
        target, {FEATURES_TENSOR: features}, {METADATA_ENTRY: json.dumps(payload, ensure_ascii=False, default=str)}
    )
    return target


def load_vocab_features(path: str | os.PathLike) -> VocabFeatures:
    """Read a ``.rtv`` file; anything else (or a damaged one) raises :class:`VocabularyError`."""
    from safetensors import SafetensorError, safe_open

    name = os.fspath(path)
    try:
        with safe_open(name, framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_ENTRY)
            if raw is None or FEATURES_TENSOR not in handle.keys():
                raise VocabularyError(f"{name}: not a ramtag vocabulary file (no {FEATURES_TENSOR} or metadata)")
            features = handle.get_tensor(FEATURES_TENSOR)
    except FileNotFoundError as exc:
        raise VocabularyError(f"{name}: no such vocabulary file") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise VocabularyError(f"{name}: not a readable vocabulary file ({exc})") from exc
    try:
        meta = json.loads(raw)
        labels = [str(label) for label in meta["labels"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise VocabularyError(f"{name}: damaged vocabulary metadata") from exc
    if features.ndim != 2 or features.shape[0] != len(labels):
        raise VocabularyError(f"{name}: {features.shape[0]} feature rows for {len(labels)} labels")
    return VocabFeatures(
        features=features.float(),
        labels=labels,
        templates=list(meta.get("templates", [])),
        fingerprint=dict(meta.get("fingerprint", {})),
        version=str(meta.get("version", "")),
        metadata=meta,
    )


def is_vocab_features_file(path: str | os.PathLike) -> bool:
    """Whether ``--labels`` names a feature file rather than a label text file (by extension)."""
    return os.fspath(path).lower().endswith((FEATURE_SUFFIX, ".safetensors"))


# ---------------------------------------------------------------------------------------------
# Cache


def cache_dir() -> Path:
    """``$RAMTAG_CACHE_DIR``, else ``$XDG_CACHE_HOME/ramtag``, else ``~/.cache/ramtag``."""
    override = os.environ.get("RAMTAG_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and os.path.isabs(os.path.expanduser(xdg)) else Path.home() / ".cache"
    return base / "ramtag"


def cached_features(fingerprint_value: str) -> Path:
    """Where label features with this fingerprint are cached (the file may not exist yet)."""
    if not _SAFE_FINGERPRINT.match(fingerprint_value):
        raise ValueError(f"fingerprint {fingerprint_value!r} is not a safe file name")
    return cache_dir() / "vocab" / f"{fingerprint_value}{FEATURE_SUFFIX}"


def store_cached_features(
    fingerprint_value: str, features: torch.Tensor, labels: Sequence[str], metadata: Mapping[str, Any]
) -> Path | None:
    """Save features into the cache; a cache that cannot be written is skipped (returns None)."""
    target = cached_features(fingerprint_value)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return save_vocab_features(target, features, labels, metadata)
    except OSError:
        return None


def load_cached_features(fingerprint_value: str) -> VocabFeatures | None:
    """Cached features for this fingerprint, or None (missing or unreadable: recompute)."""
    target = cached_features(fingerprint_value)
    if not target.is_file():
        return None
    try:
        return load_vocab_features(target)
    except VocabularyError:
        return None
