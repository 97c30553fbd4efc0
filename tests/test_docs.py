"""Documentation that must not drift: man pages from the CLI's help, examples in every --help, completion."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ramtag.cli.manpages import pages

MAN = Path(__file__).resolve().parent.parent / "man"


def test_man_pages_are_current():
    expected = pages()
    present = {path.name for path in MAN.glob("*.1")}
    stale = sorted(
        name for name, text in expected.items() if not (MAN / name).is_file() or (MAN / name).read_text() != text
    )
    assert not stale and present == set(expected), (
        f"man pages are stale or missing: {stale or sorted(present ^ set(expected))}; run `python -m "
        "ramtag.cli.manpages man`"
    )


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_pages_render_without_warnings():
    for page in sorted(MAN.glob("*.1")):
        result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr.strip(), f"{page.name}: {result.stderr}"


def test_every_command_has_examples():
    import typer

    from ramtag.cli.app import app

    root = typer.main.get_command(app)
    missing = []
    for name, command in root.commands.items():
        subcommands = getattr(command, "commands", {name: command})
        for sub_name, sub in subcommands.items():
            if sub_name not in ("selfcheck",) and "ramtag" not in (sub.epilog or "") + (sub.help or ""):
                missing.append(f"{name} {sub_name}".strip())
    assert not missing, f"commands without examples in --help: {missing}"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_scripts(shell):
    env = {**os.environ, "_RAMTAG_COMPLETE": f"source_{shell}", "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    result = subprocess.run([sys.executable, "-m", "ramtag"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ramtag" in result.stdout and len(result.stdout) > 100


@pytest.mark.parametrize("argv", [
    ["tag", "--no-such-option"], ["train", "--quiet"], ["nonsense"],
    # out-of-range numbers are usage mistakes too, not error rows for every image or a traceback
    ["tag", "x.jpg", "-l", "v.txt", "--max-pixels", "-5"], ["tag", "x.jpg", "-l", "v.txt", "--workers", "-1"],
    ["tag", "x.jpg", "-l", "v.txt", "--part-rows", "0"], ["eval", "d.json", "--batch-size", "0"],
    ["vocab", "show", "v.rtv", "-n", "-1"],
    # report paths are checked before an evaluation runs, not after it
    ["eval", "d.json", "--model", "demo", "--json", "."], ["eval", "d.json", "--model", "demo", "--calibrate", "."],
])
def test_usage_mistakes_are_one_message_and_exit_2_not_a_traceback(argv):
    result = subprocess.run([sys.executable, "-m", "ramtag", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr.lower()  # click's "Error: …" or ramtag's "ramtag: error: …"


def test_sigterm_while_starting_up_exits_130_like_ctrl_c(tmp_path):
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("cat\n")
    # Paths come from a stdin that stays open, so the run is still planning its inputs when the signal comes.
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ramtag",
            "tag",
            "-",
            "-l",
            str(vocabulary),
            "--model",
            "demo",
            "-o",
            str(tmp_path / "t.parquet"),
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # past Python's start-up, which no handler can cover
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    # 130 from sys.exit, or death by SIGINT, which CPython uses to end on a KeyboardInterrupt it counts as
    # unhandled: a shell reports both as status 130 (128 + SIGINT). Death by SIGTERM (-15, 143) is the failure.
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
