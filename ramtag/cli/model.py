"""`ramtag model fetch`: weights for machines without network."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ramtag.cli.app import app

model_app = typer.Typer(help="Backbone weights: fetch and verify them for air-gapped machines.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command(
    epilog=(
        "Example, on a machine with network:\n\n"
        "  ramtag model fetch ViT-B-16-quickgelu openai --to weights/\n\n"
        "Then copy weights/ across and, on the machine without network: ramtag tag photos/ --labels vocab.txt "
        "--pretrained weights/ViT-B-16-quickgelu-openai.safetensors (the file name ends as the download did: "
        ".safetensors, or .bin for older uploads; fetch prints it)."
    )
)
def fetch(
    name: Annotated[str, typer.Argument(help="open_clip architecture, e.g. ViT-B-16-quickgelu.")],
    tag: Annotated[str, typer.Argument(help="open_clip pretrained tag, e.g. openai.")],
    to: Annotated[str, typer.Option("--to", help="Folder to put the weights and their sha256 record in.")],
    source: Annotated[
        Optional[str],
        typer.Option("--from", help="Verify and copy a local file (e.g. from a mirror) instead of downloading."),
    ] = None,
) -> None:
    """Download NAME/TAG weights, check they load, and write them with a sha256 record into --to."""
    from ramtag.cli.options import say
    from ramtag.engine.fetch import fetch_weights

    record = fetch_weights(name, tag, to, source)
    typer.echo(f"{record['file']}  sha256 {record['sha256']}  {record['bytes']} bytes")
    say(f"use: {record['use']}")
