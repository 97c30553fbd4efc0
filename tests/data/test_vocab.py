"""Label files, the label-length hook, .rtv feature files, the feature cache and fingerprints."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from ramtag import __version__
from ramtag.data.vocab import (
    cache_dir,
    cached_features,
    check_label_lengths,
    load_cached_features,
    load_vocab_features,
    read_labels,
    save_vocab_features,
    store_cached_features,
)
from ramtag.errors import VocabularyError
from ramtag.fingerprint import fingerprint


def write(tmp_path: Path, text: str | bytes, name: str = "vocab.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


# -- label files ------------------------------------------------------------------------------


def test_label_file_skips_comments_and_blanks_and_strips(tmp_path):
    path = write(tmp_path, "\ufeff# animals\n  dog \n\ncat\n\t# indented comment\nhot dog\nC#\ncafé\n")
    parsed = read_labels(path)
    assert parsed.labels == ["dog", "cat", "hot dog", "C#", "café"]
    assert parsed.line_numbers == [2, 4, 6, 7, 8]
    assert read_labels(path).labels == parsed.labels


def test_labels_from_a_stream():
    assert read_labels(io.StringIO("a\nb\n")).labels == ["a", "b"]


def test_duplicate_names_both_lines(tmp_path):
    with pytest.raises(VocabularyError, match=r"vocab.txt:4: label 'dog' duplicates line 2$"):
        read_labels(write(tmp_path, "# x\ndog\ncat\ndog\n"))


def test_labels_differing_only_in_case_or_spacing_are_duplicates(tmp_path):
    with pytest.raises(VocabularyError, match=r":3: label 'Hot  Dog' duplicates line 1 \(they differ only in case"):
        read_labels(write(tmp_path, "hot dog\ncat\nHot  Dog\n"))


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   \n"])
def test_empty_vocabulary_is_refused(tmp_path, text):
    with pytest.raises(VocabularyError, match="the vocabulary is empty"):
        read_labels(write(tmp_path, text))


def test_non_utf8_names_its_line(tmp_path):
    with pytest.raises(VocabularyError, match=r"vocab.txt:3: not UTF-8"):
        read_labels(write(tmp_path, b"dog\ncat\ncaf\xe9\n"))


def test_missing_label_file(tmp_path):
    with pytest.raises(VocabularyError, match="no such label file"):
        read_labels(tmp_path / "absent.txt")


def test_label_length_hook_names_the_line(tmp_path):
    parsed = read_labels(write(tmp_path, "# c\ndog\na very long label indeed\n"))

    def count(label: str) -> int:  # a stand-in for the tokenizer: one token per word, plus 4
        return len(label.split()) + 4

    check_label_lengths(parsed.labels, parsed.line_numbers, count, max_tokens=9)
    with pytest.raises(
        VocabularyError, match=r"vocab.txt:3: label 'a very long label indeed' is too long .*9 tokens, at most 8"
    ):
        check_label_lengths(parsed.labels, parsed.line_numbers, count, max_tokens=8, source="vocab.txt")


def test_a_huge_label_is_refused_without_tokenizing_and_quoted_short(tmp_path):
    huge = "x" * 10_000_000
    parsed = read_labels(write(tmp_path, f"dog\n{huge}\n"))

    def count(label: str) -> int:
        assert len(label) < 1000, "the huge label was handed to the tokenizer"
        return 3

    with pytest.raises(VocabularyError) as caught:
        check_label_lengths(parsed.labels, parsed.line_numbers, count, max_tokens=77, source="vocab.txt")
    message = str(caught.value)
    assert message.startswith("vocab.txt:2: label 'xxx") and "10,000,000 characters" in message
    assert len(message) < 300


def test_a_long_duplicate_is_quoted_short(tmp_path):
    long_label = "y" * 5000
    with pytest.raises(VocabularyError, match="duplicates line 1") as caught:
        read_labels(write(tmp_path, f"{long_label}\n{long_label}\n"))
    assert len(str(caught.value)) < 400


# -- feature files ----------------------------------------------------------------------------


def features_and_meta(n_labels: int = 3, dim: int = 8):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n_labels, dim, generator=generator) * 3  # unnormalised on purpose
    meta = {
        "templates": ["a photo of a {}."],
        "fingerprint": {"model": "m" * 16, "checkpoint": "c" * 16, "templates": "t" * 16},
        "vocabulary_fingerprint": "v" * 16,
    }
    return features, meta


def test_feature_file_round_trip(tmp_path):
    features, meta = features_and_meta()
    labels = ["dog", "cat", "café"]
    path = save_vocab_features(tmp_path / "vocab.rtv", features, labels, meta)
    loaded = load_vocab_features(path)
    assert torch.equal(loaded.features, features) and loaded.features.dtype == torch.float32
    assert loaded.labels == labels
    assert loaded.templates == meta["templates"]
    assert loaded.fingerprint == meta["fingerprint"]
    assert loaded.version == __version__
    assert loaded.metadata["vocabulary_fingerprint"] == "v" * 16
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.rtv"]  # no temporary left behind


def test_feature_file_is_a_plain_safetensors_file(tmp_path):
    from safetensors.torch import load_file

    features, meta = features_and_meta()
    path = save_vocab_features(tmp_path / "v.rtv", features, ["a", "b", "c"], meta)
    assert set(load_file(path)) == {"text_features"}


def test_feature_file_errors(tmp_path):
    features, meta = features_and_meta()
    with pytest.raises(VocabularyError, match="do not fit 2 labels"):
        save_vocab_features(tmp_path / "v.rtv", features, ["a", "b"], meta)
    with pytest.raises(VocabularyError, match="no such vocabulary file"):
        load_vocab_features(tmp_path / "absent.rtv")
    with pytest.raises(VocabularyError, match="not a readable vocabulary file"):
        load_vocab_features(write(tmp_path, "dog\ncat\n", "labels.rtv"))
    from safetensors.torch import save_file

    save_file({"other": features}, str(tmp_path / "foreign.rtv"))
    with pytest.raises(VocabularyError, match="not a ramtag vocabulary file"):
        load_vocab_features(tmp_path / "foreign.rtv")


# -- cache and fingerprints -------------------------------------------------------------------


def test_cache_directory_follows_xdg_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv("RAMTAG_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ramtag"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec says: ignore relative paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ramtag"
    monkeypatch.setenv("RAMTAG_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert cached_features("0123abcd") == tmp_path / "mine" / "vocab" / "0123abcd.rtv"
    with pytest.raises(ValueError):
        cached_features("../escape")


def test_cache_stores_and_loads_by_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("RAMTAG_CACHE_DIR", str(tmp_path / "cache"))
    features, meta = features_and_meta()
    key = fingerprint("model", ["dog", "cat", "cow"])
    assert load_cached_features(key) is None
    assert store_cached_features(key, features, ["dog", "cat", "cow"], meta) == cached_features(key)
    assert torch.equal(load_cached_features(key).features, features)
    cached_features(key).write_bytes(b"damaged")
    assert load_cached_features(key) is None  # recomputed, not fatal


def test_fingerprint_is_stable_and_unambiguous():
    value = fingerprint("model", {"b": 1, "a": [1, 2]}, b"\x00", torch.arange(4))
    assert value == fingerprint("model", {"a": [1, 2], "b": 1}, b"\x00", torch.arange(4))
    assert len(value) == 16 and int(value, 16) >= 0
    assert fingerprint("ab", "c") != fingerprint("a", "bc")
    assert fingerprint("1") != fingerprint(1)
    assert fingerprint(torch.zeros(2)) != fingerprint(torch.zeros(2, dtype=torch.float64))
    assert fingerprint(torch.zeros(2, 2)) != fingerprint(torch.zeros(4))


def test_label_files_that_are_not_label_files_say_what_they_are(tmp_path):
    from ramtag.data.vocab import read_labels, save_vocab_features

    encoded = save_vocab_features(
        tmp_path / "v.rtv", torch.randn(2, 4), ["a", "b"], {"templates": ["{}"], "fingerprint": {}}
    )
    with pytest.raises(VocabularyError, match="an encoded vocabulary"):
        read_labels(encoded)
    with pytest.raises(VocabularyError, match="a folder"):
        read_labels(tmp_path)
    text = tmp_path / "labels.txt"
    text.write_text("line\u2028separator inside\r\nnext\n", encoding="utf-8")
    assert read_labels(text).labels == ["line\u2028separator inside", "next"]  # only newlines end a label
