"""Label vocabularies for a loaded model: label files or .rtv feature files, with the feature cache."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

import torch

from ramtag.data.vocab import (
    is_vocab_features_file,
    load_cached_features,
    load_vocab_features,
    read_labels,
    save_vocab_features,
    store_cached_features,
)
from ramtag.engine.runtime import Runtime
from ramtag.errors import UsageError, VocabularyError


@dataclass
class Vocabulary:
    labels: list[str]
    features: torch.Tensor
    """Unnormalised label features [C, D] (the adapter normalises them itself)."""
    templates: list[str]
    fingerprint: str
    """Identifies labels, templates and model: thresholds files and outputs record it."""
    from_cache: bool = False


def _feature_fingerprint_record(runtime: Runtime, templates: list[str], vocabulary_fingerprint: str) -> dict:
    return {
        "model": runtime.fingerprint,
        "checkpoint": runtime.source.get("checkpoint_sha256_16"),
        "templates": templates,
        "vocabulary": vocabulary_fingerprint,
    }


def encode_vocabulary(runtime: Runtime, labels: Sequence[str], templates: Sequence[str] | None = None,
                      line_numbers: Sequence[int] | None = None, use_cache: bool = True,
                      source: str | None = None) -> Vocabulary:
    """Features for `labels`, from the cache when this model already encoded them.

    ``source`` and ``line_numbers`` (the label file and the lines the labels came from) locate a label in errors."""
    labels = list(labels)
    if not labels:
        raise VocabularyError("the vocabulary is empty")
    chosen = runtime.templates(templates)
    runtime.check_label_lengths(labels, chosen, line_numbers, source)
    fingerprint = runtime.vocabulary_fingerprint(labels, chosen)
    if use_cache:
        cached = load_cached_features(fingerprint)
        if cached is not None and cached.labels == labels:
            return Vocabulary(labels, cached.features, chosen, fingerprint, from_cache=True)
    features = runtime.encode_labels(labels, chosen)
    if use_cache:
        store_cached_features(
            fingerprint,
            features,
            labels,
            {"templates": chosen, "fingerprint": _feature_fingerprint_record(runtime, chosen, fingerprint)},
        )
    return Vocabulary(labels, features, chosen, fingerprint)


def load_vocabulary(runtime: Runtime, source: str, templates: Sequence[str] | None = None,
                    stdin: TextIO | None = None, use_cache: bool = True) -> Vocabulary:
    """`--labels`: a UTF-8 label file (or `-` for stdin), or a `.rtv` feature file made for this model."""
    if source != "-" and is_vocab_features_file(source):
        stored = load_vocab_features(source)
        expected_model = runtime.fingerprint
        if stored.fingerprint.get("model") != expected_model:
            raise VocabularyError(
                f"{source} was encoded for another model or checkpoint (fingerprint {stored.fingerprint.get('model')}, "
                f"loaded model {expected_model}); re-encode it with `ramtag vocab encode LABELS -o "
                f"{Path(source).name}` "
                "using the same --checkpoint/--model options"
            )
        if templates and list(templates) != stored.templates:
            raise UsageError(f"{source} was encoded with templates {stored.templates}; drop --template or re-encode")
        fingerprint = runtime.vocabulary_fingerprint(stored.labels, stored.templates)
        return Vocabulary(stored.labels, stored.features, stored.templates, fingerprint)
    if source == "-":
        label_file = read_labels(stdin if stdin is not None else sys.stdin)
    else:
        if not Path(source).exists():
            raise VocabularyError(f"{source}: no such label file")
        label_file = read_labels(source)
    # Name the file, as every other label-file error does.
    return encode_vocabulary(runtime, label_file.labels, templates, label_file.line_numbers, use_cache,
                             source="stdin" if source == "-" else source)


def write_vocabulary_file(runtime: Runtime, vocabulary: Vocabulary, output: str | Path) -> Path:
    return save_vocab_features(
        output,
        vocabulary.features,
        vocabulary.labels,
        {
            "templates": vocabulary.templates,
            "fingerprint": _feature_fingerprint_record(runtime, vocabulary.templates, vocabulary.fingerprint),
            "model": runtime.source,
        },
    )
