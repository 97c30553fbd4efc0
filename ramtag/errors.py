"""Typed errors raised by the library; the CLI maps each to one line on stderr and an exit status."""


class RamtagError(Exception):
    """Base class for every error ramtag reports to a user without a traceback."""

    exit_code = 2


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


# Exit statuses of the `ramtag` command (documented in the README and the man pages).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SOME_INPUTS_FAILED = 3
"""The run finished, but some inputs could not be tagged: they are in the output with an error."""
EXIT_INTERRUPTED = 130


class PartialFailure(RamtagError):
    """The run completed and wrote its output, but some inputs failed (they have error rows)."""

    exit_code = EXIT_SOME_INPUTS_FAILED
