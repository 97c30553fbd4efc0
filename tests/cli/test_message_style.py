"""One message style on stderr, whatever the command and whoever words the message: every line is
``ramtag: …`` (errors ``ramtag: error: …``, warnings ``ramtag: warning: …``); a usage mistake keeps click's usage
lines above its error, as Unix tools print theirs."""

from __future__ import annotations

import warnings

import pytest

from tests.io_fixtures import run_cli, write_image

USAGE_LINES = ("Usage: ", "Try '")
"""Click's usage block, above the error line of a usage mistake."""


@pytest.fixture()
def folder(tmp_path):
    write_image(tmp_path / "photos" / "a.png", seed=1)
    (tmp_path / "vocab.txt").write_text("red\nblue\n")
    return tmp_path


def _unstyled(err: str) -> list[str]:
    return [line for line in err.splitlines() if line and not line.startswith(("ramtag: ", *USAGE_LINES))]


@pytest.mark.parametrize(
    "argv",
    [
        ["tag", "{photos}", "--bogus"],  # click: no such option
        ["tag", "{photos}"],  # click: a missing option
        ["tag", "{photos}", "--labels", "{vocab}", "--top-k", "-1"],  # click: a value out of range
        ["vocab", "build"],  # click: no such command
        ["tag", "{missing}", "--labels", "{vocab}", "-o", "-"],  # ramtag: no such input
        ["tag", "{photos}", "--labels", "{vocab}", "--model", "demo", "--pretrained", "x.bin"],  # an ignored option
    ],
    ids=["unknown-option", "missing-option", "bad-value", "unknown-command", "missing-input", "ignored-option"],
)
def test_a_failing_command_ends_with_one_ramtag_error_line(argv, folder, capsys):
    names = {"photos": folder / "photos", "vocab": folder / "vocab.txt", "missing": folder / "nothere"}
    status = run_cli(*[arg.format(**names) for arg in argv])
    err = capsys.readouterr().err
    assert status == 2
    assert _unstyled(err) == []
    assert err.rstrip().splitlines()[-1].startswith("ramtag: error: ")
    assert sum(line.startswith("ramtag: error: ") for line in err.splitlines()) == 1


def test_status_lines_of_a_command_that_succeeds_are_ramtag_lines(folder, monkeypatch, capsys):
    """data synth names each file it wrote; a library's Python warning meanwhile is a ramtag warning line."""
    import ramtag.data.synth_files

    write_dataset = ramtag.data.synth_files.write_dataset

    def write_with_a_library_warning(*args, **kwargs):
        warnings.warn("a library's\nwarning", UserWarning, stacklevel=1)
        return write_dataset(*args, **kwargs)

    monkeypatch.setattr(ramtag.data.synth_files, "write_dataset", write_with_a_library_warning)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        python_display = warnings.showwarning
        status = run_cli("data", "synth", folder / "synth", "--n", 4)
        assert warnings.showwarning is python_display  # Python's own display is back once the command ends
    err = capsys.readouterr().err
    assert status == 0
    assert _unstyled(err) == []
    assert "ramtag: warning: a library's\\nwarning (UserWarning)" in err.splitlines()
    assert any(line.startswith("ramtag:   all.txt: ") for line in err.splitlines())  # each file named


def test_explain_reports_in_ramtag_lines(folder, capsys):
    status = run_cli(
        "explain",
        folder / "photos" / "a.png",
        "--labels",
        folder / "vocab.txt",
        "--model",
        "demo",
        "-o",
        folder / "maps",
    )
    err = capsys.readouterr().err
    assert status == 0
    assert _unstyled(err) == []
    assert f"ramtag: 1 explanation(s) -> {folder / 'maps'}" in err.splitlines()
