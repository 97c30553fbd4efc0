"""`ramtag tag --sidecars`: caption .txt and XMP sidecars written as rows are tagged, next to the table.

Each tagged row's selected tags (the ``tags`` column, in its order) go to one sidecar per kind asked for
(:mod:`ramtag.data.sidecars`); error rows get none. Sidecars are written when a batch is scored, before its
work unit commits: a run stopped mid-unit redoes at most the rows of that unit it had not committed, and
writing their sidecars again is harmless in every mode (``skip`` keeps them, ``overwrite`` writes the same
text, ``append`` adds only tags a sidecar does not have yet).

Two images of one run that would share a sidecar (``a.jpg`` and ``a.png`` -> ``a.txt``): the first listed
keeps it, the other gets none, with a warning naming both (:func:`ramtag.data.sidecars.shared_sidecars`); it
counts as a sidecar that cannot be written.

A sidecar that cannot be written is a warning, not an error row: the row's tags are in the table. Each
failure is one stderr line (the first :data:`WARNED_FAILURES` of them: a read-only folder of a million images
must not flood the terminal); the summary counts them all and the run exits with the partial-failure status,
so that a script training on the captions notices.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ramtag.data.layout import output_kind
from ramtag.data.shards import is_shard_input
from ramtag.data.sidecars import (
    SIDECAR_KINDS,
    SIDECAR_MODES,
    CaptionStyle,
    SidecarError,
    SidecarWriter,
    own_image_file,
    read_exclude_tags,
    shared_sidecars,
    sidecar_path,
)
from ramtag.errors import UsageError
from ramtag.messages import one_line
from ramtag.selection import Selection

__all__ = ["SidecarOptions", "SidecarStage", "check_sidecar_options", "parse_sidecar_kinds"]

WARNED_FAILURES = 20


@dataclass(frozen=True)
class SidecarOptions:
    """What `ramtag tag` writes beside the images (nothing when ``kinds`` is empty)."""

    kinds: tuple[str, ...] = ()
    """``txt`` (comma-separated caption, the WD14/kohya convention) and/or ``xmp`` (dc:subject keywords)."""
    mode: str = "skip"
    """What happens to a sidecar that exists: ``skip`` keeps it, ``overwrite`` replaces it, ``append`` adds tags."""
    folder: str | None = None
    """Write sidecars under this folder by row key instead of beside the images (needed for shards)."""
    exclude_tags: str | None = None
    """A file of tags never written to a sidecar (they stay in the table)."""
    replace_underscores: bool = False
    prefix: str = ""
    """Written before the tags of a caption file, as given (``"trigger, "``)."""

    @property
    def enabled(self) -> bool:
        return bool(self.kinds)


def parse_sidecar_kinds(values: Sequence[str] | None) -> tuple[str, ...]:
    """``--sidecars txt --sidecars xmp`` or ``--sidecars txt,xmp``: the kinds in order, each once."""
    kinds: list[str] = []
    for value in values or ():
        for kind in value.split(","):
            kind = kind.strip().lower()
            if not kind:
                continue
            if kind not in SIDECAR_KINDS:
                raise UsageError(f"--sidecars {kind}: unknown kind; choose {' or '.join(SIDECAR_KINDS)}")
            if kind not in kinds:
                kinds.append(kind)
    return tuple(kinds)


def check_sidecar_options(
    options: SidecarOptions, inputs: Sequence[str], *, image_column: str | None = None, output: str | None = None
) -> None:
    """Everything about sidecars that can be refused before a model loads; reads only."""
    modifiers = [
        name
        for name, given in (
            ("--sidecar-mode", options.mode != "skip"),
            ("--sidecar-dir", options.folder is not None),
            ("--exclude-tags", options.exclude_tags is not None),
            ("--replace-underscores", options.replace_underscores),
            ("--prefix", bool(options.prefix)),
        )
        if given
    ]
    if not options.enabled:
        if modifiers:
            raise UsageError(f"{modifiers[0]} shapes sidecars; add --sidecars txt or --sidecars xmp")
        return
    parse_sidecar_kinds(options.kinds)
    if options.mode not in SIDECAR_MODES:
        raise UsageError(f"--sidecar-mode {options.mode}: choose {', '.join(SIDECAR_MODES)}")
    if options.exclude_tags is not None:
        read_exclude_tags(options.exclude_tags)
    if options.folder is not None:
        if Path(options.folder).exists() and not Path(options.folder).is_dir():
            raise UsageError(f"--sidecar-dir {options.folder} exists and is not a folder")
        if output and output != "-" and output_kind(output) == "dataset":
            table, folder = Path(output).absolute(), Path(options.folder).absolute()
            if folder == table or folder.is_relative_to(table):
                raise UsageError(
                    f"--sidecar-dir {options.folder} is inside the output folder {output}, which holds only the "
                    "table's parts; choose a folder beside it"
                )
        return
    shards = [item for item in inputs if is_shard_input(item)]
    if shards or image_column:
        what = f"shard {shards[0]}" if shards else f"--image-column {image_column}"
        raise UsageError(
            f"--sidecars: the images of {what} are not files of their own; give --sidecar-dir DIR to write "
            "their sidecars there by key"
        )


def _own_image_file(source: str) -> str | None:
    path = own_image_file(source)
    return path if path is not None and os.path.isfile(path) else None


@dataclass
class SidecarStage:
    """Writes the sidecars of each scored batch and remembers what went wrong."""

    options: SidecarOptions
    warn: Callable[[str], None]
    listing: Path | None = None
    """The run's frozen listing: the rows of it that share a sidecar with an earlier row get none."""
    writers: list[SidecarWriter] = field(init=False)
    shared: dict[str, tuple[str, str]] = field(init=False)
    failures: int = 0
    first_failure: str | None = None

    def __post_init__(self) -> None:
        exclude = read_exclude_tags(self.options.exclude_tags) if self.options.exclude_tags else frozenset()
        style = CaptionStyle(exclude, self.options.replace_underscores, self.options.prefix)
        self.writers = [
            SidecarWriter(kind, self.options.mode, style, self.options.folder) for kind in self.options.kinds
        ]
        self.shared = {}
        if self.listing is not None and self.listing.exists():
            self.shared = shared_sidecars(self.listing, self.options.folder)

    def write_selection(
        self, keys: Sequence[str], sources: Sequence[str], selection: Selection, labels: Sequence[str]
    ) -> None:
        """The sidecars of a scored batch: each row's selected labels, in the order of its ``tags`` column."""
        ends = np.cumsum(np.asarray(selection.counts, dtype=np.int64))
        indices = np.asarray(selection.labels, dtype=np.int64)
        rows = [[labels[i] for i in indices[end - count : end]] for end, count in zip(ends, selection.counts)]
        self.write(keys, sources, rows)

    def write(self, keys: Sequence[str], sources: Sequence[str], tags: Sequence[Sequence[str]]) -> None:
        """One sidecar per kind for each row; a failure is warned about and counted, never raised."""
        for key, source, row_tags in zip(keys, sources, tags):
            image = None if self.options.folder is not None else _own_image_file(source)
            if key in self.shared:
                self._not_written(self._shared_message(key, source, image), len(self.writers))
                continue
            for writer in self.writers:
                try:
                    writer.write(key, image, row_tags)
                except Exception as error:  # a sidecar must never end a run whose table is fine
                    detail = error if isinstance(error, (SidecarError, OSError)) else f"{key}: {error}"
                    self._not_written(f"sidecar {detail}")

    def _shared_message(self, key: str, source: str, image: str | None) -> str:
        owner, stem = self.shared[key]
        try:
            names = " and ".join(
                str(sidecar_path(writer.kind, key, image, self.options.folder)) for writer in self.writers
            )
        except SidecarError:  # the image went missing since it was listed: name what both share
            names = " and ".join(f"{stem}.{writer.kind}" for writer in self.writers)
        plural = "s" if len(self.writers) > 1 else ""
        return (
            f"sidecar{plural} {names}: {source} and {owner} would share {'them' if plural else 'it'}; "
            f"{owner} keeps {'them' if plural else 'it'}, and the tags of {source} are in the table only"
        )

    def _not_written(self, message: str, sidecars: int = 1) -> None:
        """Warns (the first WARNED_FAILURES times) and counts ``sidecars`` sidecars that were not written."""
        message = one_line(message)
        self.first_failure = self.first_failure or message
        warned_before = self.failures
        self.failures += sidecars
        if warned_before < WARNED_FAILURES:
            self.warn(f"ramtag: warning: {message}")
            if self.failures >= WARNED_FAILURES:
                self.warn("ramtag: warning: further sidecars that cannot be written are only counted")

    def counts(self) -> Counter:
        total: Counter = Counter()
        for writer in self.writers:
            total.update(writer.counts)
        total["failed"] = self.failures
        return total


def describe_counts(counts: Counter) -> str:
    """``sidecars: 3 written, 1 kept, 2 could not be written`` for the run's summary."""
    words = [(counts.get(name, 0), name) for name in ("written", "appended", "kept")]
    parts = [f"{count} {name}" for count, name in words if count]
    if counts.get("failed"):
        parts.append(f"{counts['failed']} could not be written")
    return "sidecars: " + (", ".join(parts) if parts else "none")
