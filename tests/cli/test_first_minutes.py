"""What a new user sees first: what is loading, no network said at once, stdin that waits for a terminal."""

from __future__ import annotations

import io
import socket

import pytest
from PIL import Image

from tests.io_fixtures import run_cli


@pytest.fixture()
def picture(tmp_path):
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "vocab.txt").write_text("red\nblue\n")
    return tmp_path


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network, and an empty download cache (whatever this machine has cached)."""
    import huggingface_hub.constants

    import ramtag.model.hub
    import ramtag.model.weights

    monkeypatch.setattr(ramtag.model.weights, "hub_reachable", lambda: False)
    monkeypatch.setattr(ramtag.model.hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # open_clip's URL cache, ~/.cache/clip


def test_tag_says_what_it_loads_unless_quiet(picture, tiny_checkpoint, capsys):
    argv = ("tag", picture / "red.png", "-l", picture / "vocab.txt", "-c", tiny_checkpoint, "--workers", 0)
    assert run_cli(*argv, "-o", picture / "a.jsonl") == 0
    assert capsys.readouterr().err.splitlines()[0] == f"ramtag: loading checkpoint {tiny_checkpoint} …"
    assert run_cli(*argv, "-o", picture / "b.jsonl", "--quiet") == 0
    assert capsys.readouterr().err == ""


def test_without_network_the_offline_choices_come_at_once_before_a_model_is_built(picture, offline, monkeypatch,
                                                                                   capsys):
    import open_clip

    def built(*args, **kwargs):
        raise AssertionError("a model was built for weights that cannot be downloaded")

    monkeypatch.setattr(open_clip, "create_model", built)
    assert run_cli("tag", picture / "red.png", "-l", picture / "vocab.txt", "-o", picture / "o.jsonl") == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said[0] == "ramtag: loading ViT-B-16-quickgelu / openai …"
    assert len(said) == 2 and said[1].startswith("ramtag: error: ")
    for choice in ("no network", "--pretrained FILE", "ramtag model fetch ViT-B-16-quickgelu openai", "--model demo"):
        assert choice in said[1]


def test_model_fetch_without_network_is_one_line(offline, tmp_path, capsys):
    assert run_cli("model", "fetch", "ViT-B-16-quickgelu", "openai", "--to", tmp_path / "w") == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("ramtag: error: cannot download ViT-B-16-quickgelu openai: no network")


def test_the_hub_probe_is_one_short_attempt(monkeypatch):
    from ramtag.model import hub

    def no_socket(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE=1 must need no probe")

    hub.hub_reachable.cache_clear()
    monkeypatch.setattr(socket, "create_connection", no_socket)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_reachable() is False
    monkeypatch.undo()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for variable in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    port = listening.getsockname()[1]
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        hub.hub_reachable.cache_clear()
        assert hub.hub_address() == ("127.0.0.1", port) and hub.hub_reachable() is True
    finally:
        listening.close()
    hub.hub_reachable.cache_clear()
    assert hub.hub_reachable() is False  # the port is closed now: refused, at once
    hub.hub_reachable.cache_clear()


def test_tag_from_a_terminal_says_it_reads_paths_from_stdin(picture, tiny_checkpoint, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal(f"{picture / 'red.png'}\n"))
    assert run_cli("tag", "-", "-l", picture / "vocab.txt", "-c", tiny_checkpoint, "-o", picture / "o.jsonl",
                   "--workers", 0) == 0
    assert "ramtag: reading image paths from stdin (the terminal): one per line, end with Ctrl-D" in (
        capsys.readouterr().err.splitlines()
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{picture / 'red.png'}\n"))  # a pipe: nothing to say
    assert run_cli("tag", "-", "-l", picture / "vocab.txt", "-c", tiny_checkpoint, "-o", picture / "p.jsonl",
                   "--workers", 0) == 0
    assert "stdin" not in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_run_quietly_with_status_0(tmp_path):
    import os
    import subprocess
    import sys

    from ramtag.errors import EXIT_READER_GONE

    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(60):  # many one-image batches: rows keep coming long after head has its line
        Image.new("RGB", (16, 16), (index * 4, 10, 200 - index * 3)).save(folder / f"{index:03d}.png")
    (tmp_path / "vocab.txt").write_text("red\nblue\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    tagger = subprocess.Popen(
        [sys.executable, "-m", "ramtag", "tag", str(folder), "-l", str(tmp_path / "vocab.txt"), "--model", "demo",
         "-o", "-", "-b", "1", "--workers", "0", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    head = subprocess.run(["head", "-1"], stdin=tagger.stdout, capture_output=True, timeout=120)
    tagger.stdout.close()
    stderr = tagger.stderr.read().decode()
    assert tagger.wait(timeout=120) == EXIT_READER_GONE == 0, stderr
    assert stderr == ""  # no "stdout was closed", no "Exception ignored … BrokenPipeError"
    assert head.stdout.decode().count("\n") == 1 and head.stdout.startswith(b'{"key":')
    # and so a pipefail script that stops early on purpose does not fail
    script = (f"set -o pipefail; {sys.executable} -m ramtag tag {folder} -l {tmp_path / 'vocab.txt'} --model demo "
              "-o - -b 1 --workers 0 --quiet | head -1 >/dev/null")
    assert subprocess.run(["bash", "-c", script], env=env, timeout=120, capture_output=True).returncode == 0


@pytest.mark.parametrize("stop_at", [1, 3])
def test_resume_is_advised_only_where_it_can_continue_the_run(picture, tiny_checkpoint, monkeypatch, capsys, stop_at):
    from ramtag.engine.runtime import Runtime

    for index in range(3):
        Image.new("RGB", (16, 16), (index * 60, 10, 10)).save(picture / f"more{index}.png")
    real_score = Runtime.score
    calls = {"n": 0}

    def score_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(Runtime, "score", score_then_interrupt)
    argv = ("tag", picture, "-l", picture / "vocab.txt", "-c", tiny_checkpoint, "--workers", 0, "-b", 1, "-q")
    assert run_cli(*argv, "-o", "-") == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "ramtag: interrupted"  # stdout cannot be resumed
    calls["n"] = 0
    assert run_cli(*argv, "-o", picture / f"o{stop_at}.parquet") == 130
    said = capsys.readouterr().err.strip().splitlines()[-1]
    if stop_at == 1:  # before the first row: nothing to resume
        assert said == "ramtag: interrupted; nothing was written yet"
    else:
        assert said == "ramtag: interrupted; 2 finished row(s) are kept; rerun with --resume to continue"


def test_ctrl_c_while_the_model_loads_gives_no_resume_advice(picture, monkeypatch, capsys):
    from ramtag.cli.options import ModelChoice

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelChoice, "load", interrupted)
    assert run_cli("tag", picture / "red.png", "-l", picture / "vocab.txt", "--model", "demo",
                   "-o", picture / "o.parquet") == 130
    error = capsys.readouterr().err
    assert "ramtag: interrupted" in error and "--resume" not in error


def test_ramtag_debug_shows_the_traceback_and_keeps_the_exit_status(tmp_path, monkeypatch, capsys):
    import logging

    from ramtag.errors import EXIT_STATUSES, VocabularyError

    monkeypatch.setenv("RAMTAG_DEBUG", "1")
    logger = logging.getLogger("ramtag")
    monkeypatch.setattr(logger, "handlers", [])  # the debug handler main() adds, undone after the test
    monkeypatch.setattr(logger, "level", logger.level)
    status = run_cli("tag", tmp_path, "--labels", tmp_path / "absent.txt", "-o", tmp_path / "out.parquet")
    err = capsys.readouterr().err
    assert status == VocabularyError.exit_code and status in dict(EXIT_STATUSES)
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("ramtag: error:")
