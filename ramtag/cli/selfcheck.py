"""`ramtag selfcheck`: a fast end-to-end check of the installed model code on this machine."""

from __future__ import annotations

import typer

from ramtag.cli.app import app
from ramtag.cli.options import Device


@app.command()
def selfcheck(device: Device = "auto") -> None:
    """Build a tiny random RAM model, score random images, and check the scores are valid.

    Example: [bold]ramtag selfcheck[/bold], or [bold]ramtag selfcheck --device cuda[/bold] on a GPU machine
    """
    from ramtag.engine.selfcheck import run_selfcheck

    report = run_selfcheck(device=device)
    for line in report:
        typer.echo(line)
