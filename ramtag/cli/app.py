"""The Typer application and its sub-command groups."""

from __future__ import annotations

import typer

from ramtag.cli.helpstyle import RamtagGroup

app = typer.Typer(
    name="ramtag",
    cls=RamtagGroup,
    help="Open-vocabulary multi-label image tagging with RAM (Recover and Match, CVPR 2025).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from ramtag import __version__

        typer.echo(f"ramtag {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Tag images with any vocabulary: [bold]ramtag tag ./photos --labels vocab.txt -o tags.parquet[/bold]"""
