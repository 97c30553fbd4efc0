"""A SIGTERM ends a command as interrupted (exit 130) even when a library swallows the interrupt it raises."""

from __future__ import annotations

import os
import signal
import time

from PIL import Image

import ramtag.engine.runtime
from ramtag.errors import EXIT_INTERRUPTED
from tests.io_fixtures import run_cli


def test_a_sigterm_that_a_library_swallows_still_ends_the_run_as_interrupted(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "vocab.txt").write_text("red\nblue\n")
    loaded = ramtag.engine.runtime.load_demo_clip

    def load_and_swallow(*args, **kwargs):
        result = loaded(*args, **kwargs)
        try:  # as an optional import wrapped in a bare `except:` does
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except BaseException:
            pass
        return result

    monkeypatch.setattr(ramtag.engine.runtime, "load_demo_clip", load_and_swallow)
    status = run_cli("tag", tmp_path / "red.png", "-l", tmp_path / "vocab.txt", "--model", "demo", "-o",
                     tmp_path / "t.jsonl")
    assert status == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()
