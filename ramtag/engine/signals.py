"""How long runs meet signals: SIGTERM (a scheduler's pre-emption, `kill`, `timeout`) ends a run like Ctrl-C.

Schedulers such as Slurm send SIGTERM to every process of a job, DataLoader workers included. torch's worker
handler dies of a SIGTERM that does not come from its parent, and the main process then reports the dead
worker as a RuntimeError with a traceback. Workers therefore ignore SIGTERM: the main process turns it into
KeyboardInterrupt, stops its workers itself, and exits 130 with the finished work kept for --resume.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

from ramtag.errors import Interrupted


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (a no-op elsewhere), after asking
    the decode workers to end their ``pipe:`` commands (a worker blocked reading one would not stop otherwise)."""
    global _terminated
    _terminated = False

    def handler(signum, frame):
        global _terminated
        _terminated = True
        _stop_workers_pipes()
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        from ramtag.data.pipes import allow_pipes

        allow_pipes()


_terminated = False
"""Set when a SIGTERM came: some library imports (``except:`` around an optional import) swallow the
KeyboardInterrupt the handler raises, and the command must still end as interrupted."""


def sigterm_received() -> bool:
    return _terminated


def stop_if_terminated() -> None:
    """Raise the interrupt again if a SIGTERM came and something swallowed it (a stage boundary calls this)."""
    if _terminated:
        raise KeyboardInterrupt


def decode_worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave stopping to the main process (workers still stop when it does); a
    SIGTERM only ends the worker's ``pipe:`` commands, so that a read blocked on one returns. The worker lets go
    of the output lock it inherited, so that the lock ends with the run's own process. What C decoders (libtiff)
    write to stderr goes to the debug log, not the terminal (ramtag.data.images.capture_native_stderr)."""
    from ramtag.data.images import capture_native_stderr
    from ramtag.data.layout import release_inherited_locks

    signal.signal(signal.SIGTERM, _worker_sigterm)
    release_inherited_locks()
    capture_native_stderr()


def _worker_sigterm(signum, frame) -> None:
    from ramtag.data.pipes import stop_pipes

    stop_pipes()


def _stop_workers_pipes() -> None:
    import multiprocessing
    import os

    for child in multiprocessing.active_children():  # DataLoader workers are multiprocessing children
        try:
            os.kill(child.pid, signal.SIGTERM)
        except (ProcessLookupError, TypeError):
            pass
    from ramtag.data.pipes import stop_pipes

    stop_pipes()  # the main process's own, with --workers 0


def interrupted_run(resumable_output: bool, rows_written: int) -> Interrupted:
    """The error a run stopped mid-way raises: it advises --resume only where a resume can continue it, that is
    when rows were written to a file output (stdout cannot be resumed; before the first row there is nothing to
    resume, and a plain rerun starts over)."""
    if not resumable_output:
        return Interrupted("")
    if rows_written == 0:
        return Interrupted("nothing was written yet")
    return Interrupted(f"{rows_written} finished row(s) are kept; rerun with --resume to continue")
