"""`ramtag explain`: see which regions carry each tag."""

from __future__ import annotations

from typing import Annotated, List

import typer

from ramtag.cli.app import app
from ramtag.cli.options import BatchSize, Labels, ModelChoice, model_options, say


@app.command(
    epilog=(
        "Examples:\n\n"
        "  ramtag explain examples/ --labels examples/vocab.txt --model demo -o maps/\n\n"
        "  ramtag explain photo.jpg -l vocab.txt -c ram.safetensors -o maps/ -k 5\n\n"
        "Each image gets DIR/<name>-<hash>.png: the image, then one heat map per top tag (the KCOT transport plan's "
        "share of that label in each region), captioned with tag and score."
    )
)
@model_options
def explain(
    images: Annotated[List[str], typer.Argument(help="Image files or folders.")],
    labels: Labels,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for the PNG files.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Tags (maps) per image.")] = 3,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Write into a folder that is not empty (maps of the same images are replaced)."
        ),
    ] = False,
    batch_size: BatchSize = 16,
    *,
    choice: ModelChoice,
) -> None:
    """Write, per image, a PNG with one region heat map per top tag, from the transport plan."""
    from ramtag.engine.explain import run_explain
    from ramtag.engine.preflight import preflight_explain
    from ramtag.engine.vocabulary import load_vocabulary
    from ramtag.errors import PartialFailure, UsageError

    if top_k < 1:
        raise UsageError("--top-k must be at least 1")
    preflight_explain(images, labels, output, overwrite=overwrite, checkpoint=choice.checkpoint, model=choice.model,
                      pretrained=choice.pretrained)
    runtime = choice.load()
    vocabulary = load_vocabulary(runtime, labels)
    written, failures = run_explain(
        runtime, vocabulary, images, output, top_k=top_k, batch_size=batch_size, overwrite=overwrite
    )
    for key, reason in failures:
        say(f"{key}: {reason}")
    say(f"{len(written)} explanation(s) -> {output}")
    if failures:
        raise PartialFailure(f"{len(failures)} image(s) could not be explained")
