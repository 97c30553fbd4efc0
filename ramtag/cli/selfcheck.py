"""`ramtag selfcheck`: a fast end-to-end check of the installed model code on this machine."""

from __future__ import annotations

import typer

from ramtag.cli.app import app


@app.command(epilog="Example:\n\n  ramtag selfcheck\n\nNeeds no weights and no network; it takes seconds.")
def selfcheck() -> None:
    """Build a tiny random RAM model, score random images, and check the scores are valid."""
    from ramtag.engine.selfcheck import run_selfcheck

    report = run_selfcheck()
    for line in report:
        typer.echo(line)
