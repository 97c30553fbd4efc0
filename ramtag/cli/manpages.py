"""Man pages generated from the CLI's own help, so they never drift: `python -m ramtag.cli.manpages man/`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ramtag.errors import EXIT_STATUSES


def _plain(text: str | None) -> str:
    return re.sub(r"\[/?[a-z ]+\]", "", text or "").strip()


def _roff(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)  # groff reads ASCII
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _options(command) -> list[str]:
    lines = []
    for param in command.params:
        if param.param_type_name == "argument":
            lines += [
                ".TP",
                f"\\fB{_roff(param.metavar or (param.name or '').upper())}\\fR",
                _roff(_plain(getattr(param, "help", "")) or ""),
            ]
            continue
        if param.param_type_name != "option" or getattr(param, "hidden", False):
            continue
        names = ", ".join(param.opts + param.secondary_opts)
        value = f" \\fI{_roff(param.metavar)}\\fR" if param.metavar else ""  # FILE, N, DIR: the --help's names
        help_text = _plain(param.help)
        if isinstance(param.show_default, str):  # described: depends on the machine or the model
            help_text += f" [default: {param.show_default}]"
        elif param.default not in (None, False, ()) and not param.is_flag and param.show_default is not False:
            help_text += f" [default: {param.default}]"
        lines += [".TP", f"\\fB{_roff(names)}\\fR{value}", _roff(help_text)]
    return lines


def render_page(name: str, command, version: str, parent: str | None = None) -> str:
    full = f"{parent} {name}" if parent else name
    context = command.context_class(command, info_name=full)
    usage = command.collect_usage_pieces(context)
    summary = _plain((command.help or "").split("\n\n")[0])
    lines = [
        f'.TH "{full.upper().replace(" ", "-")}" "1" "" "ramtag {version}" "User Commands"',
        ".SH NAME",
        f"{_roff(full.replace(' ', '-'))} \\- {_roff(summary)}",
        ".SH SYNOPSIS",
        f"\\fB{_roff(full)}\\fR {_roff(' '.join(usage))}",
        ".SH DESCRIPTION",
        _roff(_plain(command.help)),
    ]
    if hasattr(command, "commands"):
        lines += [".SH COMMANDS"]
        for sub_name, sub in sorted(command.commands.items()):
            lines += [".TP", f"\\fB{_roff(sub_name)}\\fR", _roff(_plain(sub.get_short_help_str(200)))]
            lines += [
                f"See \\fB{_roff(full.replace(' ', '-'))}-{_roff(sub_name)}\\fR(1)."
                if hasattr(sub, "commands") or parent is None
                else ""
            ]
    options = _options(command)
    if options:
        lines += [".SH OPTIONS", *options]
    if command.epilog:
        lines += [".SH EXAMPLES", ".nf", _roff(_plain(command.epilog).replace("\n\n", "\n")), ".fi"]
    lines += [".SH EXIT STATUS"]
    for status, meaning in EXIT_STATUSES:
        lines += [".TP", f"\\fB{status}\\fR", _roff(meaning)]
    lines += [".SH SEE ALSO", "\\fBramtag\\fR(1); the README of ramtag for the guide and the output schema."]
    return "\n".join(line for line in lines if line is not None) + "\n"


def pages() -> dict[str, str]:
    """File name -> page text, for ramtag and every sub-command (sub-groups get one page each)."""
    import typer

    from ramtag import __version__
    from ramtag.cli.app import app

    root = typer.main.get_command(app)
    result = {"ramtag.1": render_page("ramtag", root, __version__)}
    for name, command in sorted(root.commands.items()):
        result[f"ramtag-{name}.1"] = render_page(name, command, __version__, parent="ramtag")
        if hasattr(command, "commands"):
            for sub_name, sub in sorted(command.commands.items()):
                result[f"ramtag-{name}-{sub_name}.1"] = render_page(sub_name, sub, __version__, parent=f"ramtag {name}")
    return result


def write_pages(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in pages().items():
        path = folder / file_name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_pages(sys.argv[1] if len(sys.argv) > 1 else "man"):
        print(path)
