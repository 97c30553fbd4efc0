"""Mistakes that need no model are reported before one loads (a second, not the 10-50 s a model takes).

Each test makes the model loader fail the test if it is called: the message must come first.
"""

from __future__ import annotations

import pytest
from PIL import Image

from tests.test_tag import run_cli


class ModelLoaded(AssertionError):
    pass


@pytest.fixture()
def no_model(monkeypatch):
    import ramtag.engine.runtime

    def refuse(*args, **kwargs):
        raise ModelLoaded("the model was loaded before the mistake was reported")

    monkeypatch.setattr(ramtag.engine.runtime, "load_runtime", refuse)


@pytest.fixture()
def inputs(tmp_path):
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "vocab.txt").write_text("red\nblue\n")
    (tmp_path / "dupes.txt").write_text("red\nblue\nRed\n")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    (tmp_path / "weights.pt").write_bytes(b"not really weights")
    (tmp_path / "m.csv").write_text("path,id\nred.png,1\n")
    return tmp_path


def _tag(d, *extra):
    return ("tag", d / "red.png", "--model", "demo", *extra)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (lambda d: _tag(d, "-l", d / "missing.txt", "-o", d / "o.jsonl"), "no such label file"),
        (lambda d: _tag(d, "-l", d / "missing.rtv", "-o", d / "o.jsonl"), "no such vocabulary file"),
        (lambda d: _tag(d, "-l", d / "dupes.txt", "-o", d / "o.jsonl"), "duplicates line 1"),
        (lambda d: _tag(d, "-l", d / "empty.txt", "-o", d / "o.jsonl"), "the vocabulary is empty"),
        (lambda d: _tag(d, "-l", d / "vocab.txt", "-o", d / "vocab.txt"), "cannot tell the output format"),
        (lambda d: _tag(d, "-l", d / "vocab.txt", "-o", d / "red.png"), "cannot tell the output format"),
        (lambda d: _tag(d, "-l", d / "vocab.txt", "-o", "-", "--resume"), "stdout cannot be resumed"),
        (lambda d: _tag(d, "-l", d / "vocab.txt", "-o", d / "o.jsonl", "--resume", "--overwrite"), "exclude"),
        (lambda d: _tag(d, "-l", d / "vocab.txt", "-o", d / "o.jsonl", "--pretrained", d / "weights.pt"),
         "no effect with --model demo"),
        (lambda d: _tag(d, "-l", d / "vocab.txt", "-o", d / "o.jsonl", "--thresholds", d / "t.tsv"),
         "no such file"),
        (lambda d: ("tag", d / "nothere.png", "-l", d / "vocab.txt", "--model", "demo", "-o", d / "o.jsonl"),
         "no such file or directory"),
        (lambda d: ("tag", d / "m.csv", "-l", d / "vocab.txt", "--model", "demo", "-o", d / "o.jsonl",
                    "--path-column", "file"), "m.csv: no column(s) file (columns: path, id)"),
        (lambda d: ("tag", d / "m.csv", "-l", d / "vocab.txt", "--model", "demo", "-o", d / "o.jsonl",
                    "--keep-columns", "url"), "m.csv: no column(s) url"),
        (lambda d: ("explain", d / "red.png", "-l", d / "missing.txt", "--model", "demo", "-o", d / "maps"),
         "no such label file"),
        (lambda d: ("explain", d / "red.png", "-l", d / "vocab.txt", "--model", "demo", "-o", d / "maps",
                    "--pretrained", d / "weights.pt"), "no effect with --model demo"),
        (lambda d: _tag(d, "-l", d / "vocab.txt", "-o", d / "o.jsonl", "--local-temperature", "sharp"),
         "--local-temperature sharp: not a rule"),
        (lambda d: ("eval", d / "labels.jsonl", "--model", "demo", "--local-temperature", "scaled"),
         "--local-temperature scaled: not a rule"),
        (lambda d: ("vocab", "encode", d / "dupes.txt", "--model", "demo", "-o", d / "v.rtv"), "duplicates"),
        (lambda d: ("vocab", "encode", d / "missing.txt", "--model", "demo", "-o", d / "v.rtv"), "no such label"),
        (lambda d: ("vocab", "encode", d / "vocab.txt", "--model", "demo", "-o", d / "v.txt"), "must end with .rtv"),
        (lambda d: ("vocab", "encode", d / "vocab.txt", "--model", "demo", "-o", d / "v.rtv", "--pretrained",
                    d / "weights.pt"), "no effect with --model demo"),
    ],
)
def test_mistakes_are_reported_before_the_model_loads(inputs, no_model, capsys, argv, expected):
    assert run_cli(*argv(inputs)) == 2
    error = capsys.readouterr().err
    assert expected in error and error.startswith("ramtag: error:") and len(error.strip().splitlines()) == 1


def test_an_existing_output_or_interrupted_parts_are_refused_before_the_model_loads(inputs, no_model, capsys):
    out = inputs / "o.parquet"
    out.write_bytes(b"earlier output")
    assert run_cli(*_tag(inputs, "-l", inputs / "vocab.txt", "-o", out)) == 2
    assert "exists; pass --resume" in capsys.readouterr().err
    parts = inputs / ".t.parquet.parts"
    parts.mkdir()
    (parts / "part-000000-r00000-c000000.parquet").write_bytes(b"a finished part")
    assert run_cli(*_tag(inputs, "-l", inputs / "vocab.txt", "-o", inputs / "t.parquet")) == 2
    assert "an interrupted run left finished parts" in capsys.readouterr().err


def test_explain_refuses_a_folder_that_is_not_empty_like_tag_unless_overwrite(inputs, no_model, capsys):
    maps = inputs / "maps"
    maps.mkdir()
    (maps / "holiday.png").write_bytes(b"someone's picture")
    argv = ("explain", inputs / "red.png", "-l", inputs / "vocab.txt", "--model", "demo", "-o", maps)
    assert run_cli(*argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    with pytest.raises(ModelLoaded):  # with --overwrite the run goes on to load the model
        run_cli(*argv, "--overwrite")
    assert (maps / "holiday.png").read_bytes() == b"someone's picture"


def test_the_checks_pass_a_correct_command_on_to_the_model(inputs, no_model):
    with pytest.raises(ModelLoaded):
        run_cli(*_tag(inputs, "-l", inputs / "vocab.txt", "-o", inputs / "o.jsonl"))
    with pytest.raises(ModelLoaded):  # an empty folder is a fine place for maps
        (inputs / "empty-maps").mkdir()
        run_cli("explain", inputs / "red.png", "-l", inputs / "vocab.txt", "--model", "demo", "-o",
                inputs / "empty-maps")


def test_the_python_api_refuses_ignored_weights_too(inputs):
    import ramtag
    from ramtag.errors import UsageError

    with pytest.raises(UsageError, match="no effect with --model demo"):
        ramtag.load(model="demo", pretrained=str(inputs / "weights.pt"))
    with pytest.raises(UsageError, match="no effect with --checkpoint"):
        ramtag.load(checkpoint=str(inputs / "weights.pt"), pretrained=str(inputs / "weights.pt"))
