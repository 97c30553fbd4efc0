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
