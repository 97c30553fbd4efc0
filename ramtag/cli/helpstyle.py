"""One help style for every command, applied once where the app is built (so no command can drift from it).

typer labels values by Python type (``<str>``, ``<int range> [x>=0]``, ``<bool>``); a Unix tool names what a
value is: ``FILE``, ``DIR``, ``N``. Flags take no value and show none. Ranges are refused with a message when
violated, and the help text says what a special value (0: no limit) means, so the type column does not repeat
them. Defaults have one style, ``[default: …]``; where the default depends on the machine or the model, the
option's ``show_default`` text says so in its place.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import typer.core

OPTION_METAVARS = {
    "--labels": "FILE",
    "--output": "PATH",
    "--checkpoint": "FILE",
    "--pretrained": "TAG|FILE",
    "--model": "NAME",
    "--device": "DEVICE",
    "--root": "DIR",
    "--save-maps": "DIR",
    "--thresholds": "FILE",
    "--template": "TEXT",
    "--path-column": "COLUMN",
    "--keep-columns": "COLUMNS",
    "--precision": "PRECISION",
    "--ot-stop": "RULE",
    "--to": "DIR",
    "--from": "FILE",
    "--format": "FORMAT",
    "--config": "FILE",
    "--init": "FILE",
    "--scores": "TABLE",
    "--json": "FILE",
    "--plots": "DIR",
}
"""Value names by option; any other option is named by its type (:data:`TYPE_METAVARS`)."""

TYPE_METAVARS = {"int": "N", "float": "NUM", "str": "TEXT", "Path": "PATH", "list[str]": "TEXT", "list[Path]": "PATH"}

ARGUMENT_METAVARS = {
    "inputs": "INPUT",
    "images": "IMAGE",
    "labels": "LABELS",
    "path": "FILE",
    "name": "NAME",
    "tag": "TAG",
    "out": "DIR",
    "data": "DATA",
}


def _no_range() -> None:
    return None


def _no_type(ctx) -> None:  # typer's signature
    return None


def conventional(param) -> None:
    """Give one parameter the house style (an explicit metavar is kept)."""
    if isinstance(param, typer.core.TyperArgument):
        if param.metavar is None:
            param.metavar = ARGUMENT_METAVARS.get(param.name or "", (param.name or "arg").upper())
        many = "..." if param.nargs != 1 else ""
        usage = f"{param.metavar}{many}" if param.required else f"[{param.metavar}]{many}"
        param._usage_display_name = lambda: usage  # INPUT... (typer writes {INPUT}...)
        param.display_type_rich = _no_type  # the name column already says what it is
        param._get_number_range_help_str = _no_range
        return
    if not isinstance(param, typer.core.TyperOption):
        return
    if getattr(param, "is_flag", False) or param.bare_type() == "bool":
        param.metavar = ""  # a flag takes no value: nothing to name
    elif param.metavar is None:
        long_names = [name for name in param.opts if name.startswith("--")]
        named = next((OPTION_METAVARS[name] for name in long_names if name in OPTION_METAVARS), None)
        param.metavar = named or TYPE_METAVARS.get(param.bare_type(), "VALUE")
    param._get_number_range_help_str = _no_range  # the message on a bad value says the range
    if isinstance(param.show_default, str):
        described = param.show_default
        param._get_default_string = lambda **kwargs: described  # [default: cores - 1], not [default: (cores - 1)]


@contextmanager
def _paired_flags_shown_as_one(command) -> Iterator[None]:
    """``--[no-]scale-local-temperature`` while help is drawn: the pair in two columns leaves the help text of
    every option in the panel a few characters per line at 80 columns."""
    saved = []
    for param in getattr(command, "params", []):
        if isinstance(param, typer.core.TyperOption) and param.secondary_opts:
            pair = [name for name in param.opts if name.startswith("--")]
            if len(pair) == 1 and param.secondary_opts == [f"--no-{pair[0][2:]}"]:
                saved.append((param, param.opts, param.secondary_opts))
                param.opts = [f"--[no-]{pair[0][2:]}", *[name for name in param.opts if not name.startswith("--")]]
                param.secondary_opts = []
    try:
        yield
    finally:
        for param, opts, secondary in saved:
            param.opts, param.secondary_opts = opts, secondary


def _styled_command(command) -> None:
    for param in getattr(command, "params", []):
        conventional(param)
    format_help, get_help_option = command.format_help, command.get_help_option

    def styled_format_help(ctx, formatter) -> None:
        for param in command.params:  # again: typer adds its completion options after the tree is built
            conventional(param)
        with _paired_flags_shown_as_one(command):
            format_help(ctx, formatter)

    def styled_help_option(ctx):
        option = get_help_option(ctx)
        if option is not None:
            conventional(option)
        return option

    command.format_help, command.get_help_option = styled_format_help, styled_help_option


def apply_house_style(command) -> None:
    """The house style for ``command`` and its sub-commands, recursively."""
    _styled_command(command)
    for sub in getattr(command, "commands", {}).values():
        apply_house_style(sub)


class RamtagGroup(typer.core.TyperGroup):
    """The root group: when typer builds the command tree, every command gets the house style."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        apply_house_style(self)
