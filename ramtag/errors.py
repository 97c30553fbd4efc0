"""Typed errors raised by the library; the CLI maps each to one line on stderr and an exit status."""

from __future__ import annotations

import errno
import os

# Exit statuses of the `ramtag` command. EXIT_STATUSES is the one table the CLI's help, the man pages and the README
# describe them from.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SOME_INPUTS_FAILED = 3
"""The run finished, but some inputs could not be tagged: they are in the output with an error."""
EXIT_STORAGE_FULL = 4
"""The output could not be written: the disk or quota is full, a file grew past a limit, or the filesystem is
read-only. What was committed before it is kept, so freeing space and rerunning with --resume continues the run."""
EXIT_INTERRUPTED = 130
"""Ctrl-C or SIGTERM (128 + SIGINT, what a shell reports for Ctrl-C)."""

EXIT_READER_GONE = EXIT_OK
"""The reader of stdout went away (`ramtag tag … -o - | head -1`): an intended early stop, not a failure.

0, as head, grep and ripgrep users expect, rather than 141 (128 + SIGPIPE), which fails `set -o pipefail` scripts."""

EXIT_STATUSES: tuple[tuple[int, str], ...] = (
    (
        EXIT_OK,
        "Success: every input was processed, or the reader of -o - stopped reading (`| head`), which ends the run"
        " quietly: an intended early stop, so `set -o pipefail` scripts do not fail.",
    ),
    (EXIT_USAGE, "Usage error: bad options, unreadable vocabulary, mismatched or corrupt checkpoint, existing output."),
    (
        EXIT_SOME_INPUTS_FAILED,
        "The run finished and wrote its output, but some inputs failed: error rows (tag), images left out of the"
        " metrics (eval), images skipped (train, listed in bad-images.txt), images not explained (explain).",
    ),
    (
        EXIT_STORAGE_FULL,
        "Out of space: the output could not be written (disk or quota full, file size limit, read-only"
        " filesystem); what was committed is kept, and --resume continues once there is room.",
    ),
    (
        EXIT_INTERRUPTED,
        "Interrupted (Ctrl-C or SIGTERM); a tag run keeps the rows it finished in its output file, and its message"
        " says when --resume can continue it (not for -o -, nor before the first row).",
    ),
)


def exit_status_help() -> str:
    """The table as one paragraph for a command's --help."""
    return "Exit status: " + "; ".join(f"{status} {_first_clause(meaning)}" for status, meaning in EXIT_STATUSES) + "."


def _first_clause(meaning: str) -> str:
    clause = meaning.split(":")[0].split(";")[0].rstrip(".")
    return clause[0].lower() + clause[1:]


class RamtagError(Exception):
    """Base class for every error ramtag reports to a user without a traceback."""

    exit_code = EXIT_USAGE


class UsageError(RamtagError):
    """Bad options or arguments (exit status 2)."""


class CheckpointError(RamtagError):
    """A checkpoint or weights file is missing, corrupt or does not match the model."""


class VocabularyError(RamtagError):
    """A label vocabulary is empty, has duplicates, overlong labels, or belongs to another model."""


class DataError(RamtagError):
    """An input list, manifest, annotation file or shard pattern cannot be used."""


class OutputError(RamtagError):
    """The output exists (without --resume/--overwrite) or cannot be written."""


class ReaderGone(OutputError):
    """Whoever read stdout stopped (a closed pipe): the run ends quietly with :data:`EXIT_READER_GONE`."""

    exit_code = EXIT_READER_GONE


STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
"""Write failures that no retry fixes but a user can (free space, raise a quota or limit, remount): a week-long
run that meets one must stop with one line saying so, keeping what it committed, not with a traceback."""


class StorageFull(RamtagError):
    """The output's storage refused a write (ENOSPC, EDQUOT, EFBIG, EROFS): the run stops with what it committed."""

    exit_code = EXIT_STORAGE_FULL

    @classmethod
    def from_os_error(cls, error: OSError) -> StorageFull:
        # pyarrow's errors carry the errno but neither the file nor a plain reason
        where = f"cannot write {error.filename}" if error.filename else "cannot write the output"
        return cls(
            f"{where}: {os.strerror(error.errno or 0)}; the units committed so far are kept: make room, then rerun"
            " the same command with --resume (a file output; -o - cannot be resumed)"
        )


class Interrupted(RamtagError):
    """A run stopped by Ctrl-C or SIGTERM; the message is the advice for what comes next (may be empty)."""

    exit_code = EXIT_INTERRUPTED


class PartialFailure(RamtagError):
    """The run completed and wrote its output, but some inputs failed (they have error rows)."""

    exit_code = EXIT_SOME_INPUTS_FAILED
