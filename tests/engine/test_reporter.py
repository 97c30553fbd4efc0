"""The one progress display (ramtag.engine.reporter): a bar on a terminal, plain lines otherwise, and `tag`,
`train` and `eval` all showing their progress through it."""

from __future__ import annotations

import json
import re

import pytest

from ramtag.engine import reporter
from ramtag.engine.reporter import ImageProgress, Reporter
from tests.eval_fixtures import Bench
from tests.io_fixtures import run_cli
from tests.train_fixtures import write_init_checkpoint, write_reference_json

RATE = r"\d+\.\d img/s"
ESCAPE = "\x1b["


@pytest.fixture()
def every_update(monkeypatch):
    """A plain progress line on every update, rather than every 10 seconds."""
    monkeypatch.setattr(reporter, "PLAIN_EVERY_S", 0.0)


def terminal(monkeypatch, is_terminal: bool) -> None:
    monkeypatch.setattr(reporter, "stderr_is_terminal", lambda: is_terminal)


def test_without_a_terminal_progress_is_plain_lines_and_messages_are_written_as_given(every_update, capsys):
    progress = ImageProgress(3, "tagging")
    progress.advance(1)
    progress.log("ramtag: warning: a\tb.png: :cat: cannot be decoded")
    progress.advance(2, errors=1)
    progress.close()
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert re.fullmatch(rf"ramtag: 1/3 images, {RATE}, 0 errors", lines[0])
    assert lines[1] == "ramtag: warning: a\tb.png: :cat: cannot be decoded"  # no tab expanded, no emoji
    assert re.fullmatch(rf"ramtag: 3/3 images, {RATE}, 1 errors", lines[2])
    assert len(lines) == 3 and captured.out == ""


def test_plain_lines_come_at_most_every_interval(capsys):
    progress = ImageProgress(None, "tagging")  # the default interval: far longer than this test
    for _ in range(5):
        progress.advance(1)
    progress.log("done")
    assert capsys.readouterr().err == "done\n"


def test_quiet_writes_nothing_even_on_a_terminal(every_update, monkeypatch, capsys):
    for is_terminal in (False, True):
        terminal(monkeypatch, is_terminal)
        progress = ImageProgress(2, "tagging", quiet=True)
        progress.advance(2, errors=1)
        progress.log("ramtag: warning: x")
        progress.close()
        assert capsys.readouterr() == ("", "")


def test_on_a_terminal_the_bar_and_its_messages_go_to_stderr_never_stdout(monkeypatch, capsys):
    """stdout carries data (`tag -o -`): the bar used to draw on it, and its last frame ended up in the output."""
    terminal(monkeypatch, True)
    progress = ImageProgress(3, "tagging")
    progress.advance(3)
    progress.log("ramtag: warning: a message")
    progress.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "tagging" in captured.err and "3/3" in captured.err and "ramtag: warning: a message" in captured.err


def test_a_forced_bar_without_a_terminal_stops_the_plain_lines(every_update, capsys):
    display = Reporter(bar=True)
    task = display.task("work", 2)
    display.update(task, completed=2, line=lambda: "a plain line")
    display.close()
    err = capsys.readouterr().err
    assert "a plain line" not in err and "work" in err and "2/2" in err  # the final frame, printed once


# -- every command shows its progress through the reporter --------------------------------------------------------


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reporter-train")
    return root, write_reference_json(root, "train.json", 8, seed=0), write_init_checkpoint(root / "init.safetensors")


def _tag(tmp_path, tiny_checkpoint):
    from PIL import Image

    for index in range(3):
        Image.new("RGB", (16, 16), (60 * index, 10, 200)).save(tmp_path / f"{index}.png")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red\nblue\n")
    args = ("tag", tmp_path, "-l", vocab, "-c", tiny_checkpoint, "-o", "-", "-b", 1, "--workers", 0)
    return run_cli(*args)


def _train(tmp_path, training_data):
    root, annotations, init = training_data
    args = (
        "train",
        annotations,
        "--root",
        root,
        "--init",
        init,
        "-o",
        tmp_path / "run",
        "--batch-size",
        4,
        "--workers",
        0,
        "--max-steps",
        2,
        "--log-every",
        1,
    )
    return run_cli(*args)


def _eval(bench: Bench):
    return run_cli(*bench.args("--unseen", str(bench.unseen)))


@pytest.mark.parametrize("is_terminal", [True, False], ids=["terminal", "plain"])
def test_tag_shows_its_progress_through_the_reporter(
    is_terminal, every_update, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    terminal(monkeypatch, is_terminal)
    assert _tag(tmp_path, tiny_checkpoint) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["key"] for line in captured.out.splitlines()] == ["0.png", "1.png", "2.png"]
    plain = re.findall(rf"^ramtag: (\d)/3 images, {RATE}, 0 errors$", captured.err, flags=re.MULTILINE)
    if is_terminal:
        assert "tagging" in captured.err and "img/s" in captured.err and ESCAPE in captured.err and not plain
    else:
        assert set(plain) == {"1", "2", "3"} and ESCAPE not in captured.err  # each batch: no interval to wait


@pytest.mark.parametrize("is_terminal", [True, False], ids=["terminal", "plain"])
def test_train_shows_its_progress_through_the_reporter(is_terminal, training_data, tmp_path, monkeypatch, capsys):
    terminal(monkeypatch, is_terminal)
    assert _train(tmp_path, training_data) == 0
    err = capsys.readouterr().err
    steps = re.findall(r"^ramtag: step (\d)/2 epoch", err, flags=re.MULTILINE)
    if is_terminal:
        assert "train" in err and "2/2" in err and "loss " in err and ESCAPE in err and not steps
    else:
        assert steps == ["1", "2"] and ESCAPE not in err


@pytest.mark.parametrize("is_terminal", [True, False], ids=["terminal", "plain"])
def test_eval_shows_its_progress_through_the_reporter(is_terminal, bench: Bench, monkeypatch, capsys):
    terminal(monkeypatch, is_terminal)
    assert _eval(bench) == 3  # the bench has a missing and a corrupt image
    captured = capsys.readouterr()
    assert "GZSL" in captured.out and "warning: " in captured.err
    if is_terminal:
        assert "scoring (zsl)" in captured.err.lower() and ESCAPE in captured.err
    else:
        assert "scoring" not in captured.err and ESCAPE not in captured.err  # nothing but the messages
