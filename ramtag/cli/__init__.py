"""The `ramtag` command line: parses options, calls the engine, maps errors to one line and an exit status."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from ramtag.cli import commands  # noqa: F401  (each command module registers itself on the app)
from ramtag.cli.app import app
from ramtag.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_READER_GONE,
    EXIT_STORAGE_FULL,
    STORAGE_FULL_ERRNOS,
    Interrupted,
    RamtagError,
    ReaderGone,
    StorageFull,
)


def main(argv: list[str] | None = None) -> None:
    from ramtag.data.images import native_stderr_to_log
    from ramtag.engine.signals import sigterm_as_interrupt, sigterm_received

    python_warnings = warnings.showwarning
    if os.environ.get("RAMTAG_DEBUG"):
        _show_debug_log()
    else:
        warnings.showwarning = _show_warning
    # SIGTERM ends any command like Ctrl-C (exit 130, finished work kept), from the start: a run stopped while
    # it loads its model exits the same way as one stopped while tagging. What C decoders (libtiff) write to
    # stderr while this process decodes (--workers 0, explain) goes to the debug log, as in decode workers.
    try:
        with sigterm_as_interrupt(), native_stderr_to_log():
            try:
                _run(argv)
            except SystemExit as done:
                if done.code == EXIT_INTERRUPTED or not sigterm_received():
                    raise
            if sigterm_received():  # a library swallowed the interrupt: the command still ends as stopped
                print("ramtag: interrupted", file=sys.stderr)
                sys.exit(EXIT_INTERRUPTED)
    finally:
        warnings.showwarning = python_warnings


def _run(argv: list[str] | None) -> None:
    try:
        # Without standalone mode click returns (not raises) the status of an abort or an explicit exit.
        status = app(args=argv, prog_name="ramtag", standalone_mode=False)
        if isinstance(status, int) and status != EXIT_OK:
            if status == EXIT_INTERRUPTED:  # stopped outside a run that knows what can be resumed (start-up)
                print("ramtag: interrupted", file=sys.stderr)
            sys.exit(status)
    except (ReaderGone, BrokenPipeError):  # `| head` stopped reading: what it wanted is written
        _silence_stdout()
        sys.exit(EXIT_READER_GONE)
    except Interrupted as error:  # the run says whether --resume can continue it
        print(f"ramtag: interrupted; {error}" if str(error) else "ramtag: interrupted", file=sys.stderr)
        sys.exit(error.exit_code)
    except RamtagError as error:
        if os.environ.get("RAMTAG_DEBUG"):  # the traceback, and still the status a script tests for
            import traceback

            traceback.print_exc()
        print(f"ramtag: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("ramtag: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as error:  # a write the storage refused outside the part writer (the plan, the final table)
        if error.errno not in STORAGE_FULL_ERRNOS:
            raise
        if os.environ.get("RAMTAG_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"ramtag: error: {StorageFull.from_os_error(error)}", file=sys.stderr)
        sys.exit(EXIT_STORAGE_FULL)
    except SystemExit:
        raise
    except Exception as error:  # click usage errors and friends
        _exit_for_click_error(error)
        raise


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it is rebound while decoders are captured)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler sets it once; the property decides
        pass


def _show_debug_log() -> None:
    """ramtag's debug log (decoder warnings and the like) on stderr, one ``ramtag: debug:`` line each; decode
    workers are forked from this process and inherit it."""
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("ramtag: debug: %(message)s"))
    logger = logging.getLogger("ramtag")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def _click_exception_types(name: str) -> tuple[type, ...]:
    """Click's exception class ``name`` from click itself and from the copy newer typer vendors.

    typer >= 0.2x ships its own click (``typer._click``) whose exceptions are not click's, so catching
    only ``click.ClickException`` lets an unknown option escape as a traceback.
    """
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _exit_for_click_error(error: Exception) -> None:
    if isinstance(error, _click_exception_types("Exit")):
        sys.exit(error.exit_code)
    if isinstance(error, _click_exception_types("ClickException")):
        _show_click_error(error)
        sys.exit(error.exit_code)
    if isinstance(error, _click_exception_types("Abort")):
        print("ramtag: aborted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _show_click_error(error: Exception) -> None:
    """Click's usage lines as click writes them, then its ``Error: …`` as ``ramtag: error: …``, the line every
    ramtag error ends with."""
    import io

    from ramtag.messages import one_line

    shown = io.StringIO()
    error.show(file=shown)  # type: ignore[attr-defined]
    message = error.format_message()  # type: ignore[attr-defined]
    usage, found, _ = shown.getvalue().rpartition(f"Error: {message}")
    if not found:  # a click that words it otherwise: as it is
        print(shown.getvalue(), end="", file=sys.stderr)
        return
    print(f"{usage}ramtag: error: {one_line(message)}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning (torch's, a library's) as one ``ramtag: warning: …`` line; RAMTAG_DEBUG=1 keeps Python's
    own format, with the file and line that raised it."""
    from ramtag.messages import one_line

    print(f"ramtag: warning: {one_line(str(message))} ({category.__name__})", file=file or sys.stderr)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit does not fail on the closed pipe a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (a test's capture)
        pass
