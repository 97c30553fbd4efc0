"""``pipe:`` shard streams that stop when the run stops.

webdataset runs a ``pipe:`` command (``aws s3 cp … -``, ``curl …``, ``gsutil cat …``) with ``Popen`` in the
reading process. Under ramtag that process is a DataLoader worker that ignores SIGTERM (engine/signals.py), and
an ignored signal stays ignored across ``exec``: the shell and the command it spawns ignored SIGTERM too, so
``timeout`` or a scheduler's SIGTERM waited on a hung download, and a killed run left the worker and its command
behind. Here each command gets SIGTERM back, a process group of its own (so the shell and everything it started
stop together), and on Linux the kernel's parent-death signal, so it cannot outlive the process reading it.
:func:`stop_pipes` ends every command this process started; the reading worker runs it when the run stops.
"""

from __future__ import annotations

import os
import signal
import weakref
from typing import Any

_RUNNING: weakref.WeakSet[Any] = weakref.WeakSet()
"""The Popen objects of this process's pipe commands that may still run."""

_PR_SET_PDEATHSIG = 1

_stopping = False
"""Set once the run stops: no new command starts, and a stopped command's stream reads as an interruption."""


def _prepare_child() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: stop_pipes and the reader's close still end it
        pass


def open_pipe(command: str, bufsize: int = 8192) -> Any:
    """A readable stream of ``command``'s stdout, as webdataset's own ``pipe:`` opener gives (its ``Pipe``, which
    raises on a non-zero exit status when read to the end), but stoppable: see the module docstring."""
    from webdataset.gopen import Pipe

    if _stopping:
        raise KeyboardInterrupt
    pipe = Pipe(
        command,
        mode="rb",
        shell=True,
        bufsize=bufsize,
        ignore_status=[141],  # SIGPIPE: the reader stopped early, as webdataset treats it
        start_new_session=True,
        preexec_fn=_prepare_child,  # workers are single-threaded; nothing else can fork here
    )
    _RUNNING.add(pipe.proc)
    return _StoppingPipe(pipe)


class _StoppingPipe:
    """The webdataset Pipe, whose command is ended when the stream is closed before the command has finished."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def read(self, *args: Any) -> bytes:
        # A command ended by stop_pipes is an interruption, not a broken shard: an error row for it would be
        # committed with its unit and kept by --resume. Torch's worker loop ends quietly on KeyboardInterrupt.
        try:
            data = self._pipe.read(*args)
        except OSError:
            if _stopping:
                raise KeyboardInterrupt from None
            raise
        if not data:
            if _stopping:
                raise KeyboardInterrupt
            # The command's stdout can close a moment before it exits, so webdataset's poll after the last read
            # may not see the status yet: a failed command would then read as a clean (possibly empty) stream.
            if self._pipe.status is None:
                self._pipe.wait_for_child()
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if _stopping or self._pipe.proc.poll() is None:  # closed early (an error, a stop): end the command
            _stop(self._pipe.proc)
            self._pipe.stream.close()
            self._pipe.proc.wait()
            return
        if self._pipe.status is not None:  # its status was read (and raised, if it failed) already
            self._pipe.stream.close()
            return
        self._pipe.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


def _stop(proc: Any) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the session's group: the shell and every command it started
    except (ProcessLookupError, PermissionError):
        pass


def stop_pipes() -> None:
    """End every pipe command this process started that still runs, and start no more (safe in a signal
    handler)."""
    global _stopping
    _stopping = True
    for proc in list(_RUNNING):
        if proc.poll() is None:
            _stop(proc)


def allow_pipes() -> None:
    """Let pipe commands start again (a later run in the same process, after one was stopped)."""
    global _stopping
    _stopping = False
