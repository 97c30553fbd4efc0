"""`ramtag selfcheck`: a fast end-to-end check of the installed model code on this machine."""

from __future__ import annotations

import typer

from ramtag.cli.app import app
from ramtag.cli.options import Device


@app.command(
    epilog=(
        "Examples:\n\n  ramtag selfcheck\n\n  ramtag selfcheck --device cuda   # on a GPU machine\n\n"
        "Needs no weights and no network; it takes seconds."
    )
)
def selfcheck(device: Device = "auto") -> None:
    """Build a tiny random RAM model, score random images, and check the scores are valid."""
    from ramtag.engine.selfcheck import run_selfcheck

    report = run_selfcheck(device=device)
    for line in report:
        typer.echo(line)
