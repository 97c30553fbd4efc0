"""Checks that need no model, made before one loads: a mistake costs a second, not the 10-50 s a model takes.

Every command that runs a model calls the check for its options first (the CLI right after parsing, the
engine again on entry, so the Python API gets them too). Each check only reads: nothing is created or locked.
What the model decides (label lengths in tokens, a .rtv file's model fingerprint) is checked after it loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ramtag.data.layout import check_output
from ramtag.data.units import check_input_columns
from ramtag.data.vocab import is_vocab_features_file, read_labels
from ramtag.engine.runtime import check_model_choice
from ramtag.engine.sidecars import check_sidecar_options
from ramtag.errors import DataError, OutputError, UsageError, VocabularyError

__all__ = [
    "check_inputs",
    "check_label_source",
    "check_labels_out",
    "check_maps_folder",
    "check_model_choice",
    "preflight_explain",
    "preflight_tag",
    "preflight_vocab_encode",
]

_PATTERN_CHARACTERS = frozenset("{}*?[")


def check_label_source(source: str) -> None:
    """``--labels``: a label file that exists, is UTF-8 and holds distinct labels, or a .rtv file that exists.

    ``-`` (stdin) is read once, by the engine, so it is not checked here.
    """
    if source == "-":
        return
    if is_vocab_features_file(source):
        if not Path(source).is_file():
            raise VocabularyError(f"{source}: no such vocabulary file")
        return
    read_labels(source)  # raises on a missing, unreadable, empty or duplicated vocabulary


def check_inputs(inputs: Sequence[str]) -> None:
    """Plain paths on the command line exist (lists, stdin, patterns, shards and URLs are planned later)."""
    if not inputs:
        raise DataError("no inputs given")
    for item in inputs:
        if item == "-" or item.startswith(("@", "pipe:")) or "://" in item or _PATTERN_CHARACTERS & set(item):
            continue
        if not os.path.exists(item):
            raise DataError(f"{item}: no such file or directory")


def check_maps_folder(folder: str, *, overwrite: bool) -> None:
    """A folder for region-map PNGs: new or empty, or an existing one only with --overwrite (as `tag -o` is)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{folder} exists and is not a folder; choose another one for the region maps")
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise OutputError(
            f"{folder} exists and is not empty; pass --overwrite to write the maps into it (maps of the same "
            "images are replaced, other files stay) or choose another folder"
        )


def preflight_tag(options, *, checkpoint=None, model: str | None = None, pretrained: str | None = None,
                  is_main: bool = True) -> None:
    """Everything `ramtag tag` can refuse without a model, for ``options`` (a ramtag.engine.tag.TagOptions: not
    imported, which would be an import circle). Only rank 0 checks the output: it alone prepares it."""
    if model is not None:
        check_model_choice(checkpoint, model, pretrained)
    if is_main:
        check_output(options.output, resume=options.resume, overwrite=options.overwrite)
    elif options.resume and options.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    check_label_source(options.labels)
    if options.thresholds_file and not Path(options.thresholds_file).is_file():
        raise UsageError(f"--thresholds {options.thresholds_file}: no such file")
    if options.save_maps and Path(options.save_maps).exists() and not Path(options.save_maps).is_dir():
        raise OutputError(f"--save-maps {options.save_maps} exists and is not a folder")
    check_inputs(options.inputs)
    sidecars = getattr(options, "sidecars", None)
    if sidecars is not None:
        check_sidecar_options(
            sidecars, options.inputs, image_column=getattr(options, "image_column", None), output=options.output
        )
    labels_out = getattr(options, "labels_out", None)
    if labels_out is not None:
        check_labels_out(labels_out, options.output)
    check_input_columns(
        options.inputs, keep_columns=options.keep_columns, image_column=getattr(options, "image_column", None),
        key_column=getattr(options, "key_column", None), path_column=getattr(options, "path_column", "path"),
        root=getattr(options, "root", None),
    )


def check_labels_out(path: str, output: str) -> None:
    """``--labels-out FILE``: a file to (re)write, not a folder, not stdout, not the table itself."""
    if path == "-":
        raise UsageError("--labels-out needs a file name; stdout carries the rows")
    if Path(path).is_dir():
        raise UsageError(f"--labels-out {path} is a folder; name the file to write")
    if output != "-" and Path(path).absolute() == Path(output).absolute():
        raise UsageError(f"--labels-out {path} is the output itself; choose another file")


def preflight_explain(images: Sequence[str], labels: str, output: str, *, overwrite: bool = False, checkpoint=None,
                      model: str | None = None, pretrained: str | None = None) -> None:
    """Everything `ramtag explain` can refuse without a model."""
    if model is not None:
        check_model_choice(checkpoint, model, pretrained)
    check_maps_folder(output, overwrite=overwrite)
    check_label_source(labels)
    check_inputs(images)


def preflight_vocab_encode(labels: str, output: str, *, checkpoint=None, model: str | None = None,
                           pretrained: str | None = None) -> None:
    """Everything `ramtag vocab encode` can refuse without a model."""
    if model is not None:
        check_model_choice(checkpoint, model, pretrained)
    if not output.lower().endswith(".rtv"):
        raise UsageError("--output must end with .rtv")
    if Path(output).is_dir():
        raise OutputError(f"--output {output} is a folder; name the .rtv file to write")
    check_label_source(labels)
