"""``pipe:`` shards stop with the run: SIGTERM ends a run blocked reading a hung command, and leaves no process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ramtag.data.pipes import allow_pipes, open_pipe, stop_pipes


def _running(marker: str) -> list[int]:
    """PIDs of processes whose command line holds ``marker`` (read from /proc: no pgrep needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # The run's own command line names its ``pipe:sleep …`` input too: only the pipe's processes count.
        if marker in command and "pytest" not in command and "ramtag" not in command:
            found.append(int(entry.name))
    return found


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("workers", [1, 0])
def test_sigterm_stops_a_run_blocked_on_a_hung_pipe_within_5_s_and_leaves_no_process(tmp_path, workers):
    marker = f"{600 + workers}.{os.getpid() % 1000:03d}"  # a `sleep` no other test runs
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("cat\ndog\n")
    command = [
        sys.executable, "-m", "ramtag", "tag", f"pipe:sleep {marker}", "-l", str(vocabulary), "--model", "demo",
        "-o", str(tmp_path / "t.parquet"), "--workers", str(workers), "--quiet",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: _running(f"sleep {marker}"), 120), "the run never started its pipe command"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        stopped_after = time.monotonic() - signalled
    finally:
        process.kill()
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert stopped_after < 5, f"took {stopped_after:.1f} s to stop"
    assert "Traceback" not in stderr
    assert _wait_for(lambda: not _running(f"sleep {marker}"), 2), "the pipe command outlived the run"


def test_a_stopped_pipe_reads_as_an_interruption_not_a_broken_shard():
    stream = open_pipe("sleep 30; echo late")
    try:
        stop_pipes()
        with pytest.raises(KeyboardInterrupt):
            stream.read(10)
        with pytest.raises(KeyboardInterrupt):  # and no new command starts while the run stops
            open_pipe("echo never")
    finally:
        stream.close()
        allow_pipes()


def test_a_pipe_reads_its_command_and_reports_a_failed_one():
    stream = open_pipe("printf abc")
    assert stream.read() == b"abc"
    stream.close()
    failing = open_pipe("exit 3")
    with pytest.raises(OSError, match=r": exit 3 \("):  # the status shards.py turns into the shard's error row
        failing.read()
    failing.close()


def test_closing_a_pipe_early_ends_its_command(tmp_path):
    marker = f"599.{os.getpid() % 1000:03d}"
    stream = open_pipe(f"sleep {marker}")
    assert _wait_for(lambda: _running(f"sleep {marker}"), 10)
    stream.close()
    assert _wait_for(lambda: not _running(f"sleep {marker}"), 2)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_killed_run_leaves_its_output_lock_free_while_its_worker_lingers(tmp_path):
    from ramtag.data.layout import _lock_output, _unlock_output

    marker = f"602.{os.getpid() % 1000:03d}"
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("cat\ndog\n")
    out = tmp_path / "t.parquet"
    command = [
        sys.executable, "-m", "ramtag", "tag", f"pipe:sleep {marker}", "-l", str(vocabulary), "--model", "demo",
        "-o", str(out), "--workers", "1", "--quiet",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    try:
        assert _wait_for(lambda: _running(f"sleep {marker}"), 120), "the run never started its pipe command"
        workers = _children(process.pid)
        assert workers
        process.kill()  # as torchrun's agent or the OOM killer does: no handler runs
        process.wait(timeout=10)
        assert any(Path(f"/proc/{pid}").exists() for pid in workers)  # the worker outlives its run for a while
        _lock_output(out)  # the run that replaces it (a torchrun restart) gets the lock at once
        _unlock_output(out)
    finally:
        process.kill()
        for pid in _running(f"sleep {marker}"):  # ending the pipe ends the worker reading it
            os.kill(pid, signal.SIGKILL)
