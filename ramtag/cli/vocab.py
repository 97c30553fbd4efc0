"""`ramtag vocab encode|show`: label text features, computed once and cached."""

from __future__ import annotations

from typing import Annotated

import typer

from ramtag.cli.app import app
from ramtag.cli.options import (
    DEFAULT_DEVICE,
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    Checkpoint,
    Device,
    ModelChoice,
    ModelName,
    Pretrained,
    Template,
    say,
)

vocab_app = typer.Typer(
    help="Encode a label vocabulary into text features (.rtv) and inspect such files.", no_args_is_help=True
)
app.add_typer(vocab_app, name="vocab")


@vocab_app.command(
    epilog=(
        "Examples:\n\n"
        "  ramtag vocab encode vocab.txt -o vocab.rtv --checkpoint ram.safetensors\n\n"
        "  ramtag vocab encode examples/vocab.txt -o demo.rtv --model demo\n\n"
        "A .rtv file works only with the model options that encoded it."
    )
)
def encode(
    labels: Annotated[str, typer.Argument(help="Label file: UTF-8, one label per line, # comments.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The .rtv file to write.")],
    template: Template = None,
    checkpoint: Checkpoint = None,
    model: ModelName = DEFAULT_MODEL,
    pretrained: Pretrained = DEFAULT_PRETRAINED,
    device: Device = DEFAULT_DEVICE,
) -> None:
    """Encode LABELS with the model's text encoder into a .rtv file that `ramtag tag --labels` accepts."""
    from ramtag.engine.preflight import preflight_vocab_encode
    from ramtag.engine.vocabulary import load_vocabulary, write_vocabulary_file

    preflight_vocab_encode(labels, output, checkpoint=checkpoint, model=model, pretrained=pretrained)
    runtime = ModelChoice(checkpoint, model, pretrained, device).load()
    vocabulary = load_vocabulary(runtime, labels, template or None, use_cache=False)
    path = write_vocabulary_file(runtime, vocabulary, output)
    say(f"{len(vocabulary.labels)} labels, {vocabulary.features.shape[1]}-d features -> {path}")


@vocab_app.command(
    epilog=(
        "Example:\n\n  ramtag vocab show vocab.rtv\n\n"
        "Prints the label count, templates and model fingerprint, then one label per line."
    )
)
def show(
    path: Annotated[str, typer.Argument(help="A .rtv file.")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=0, help="Labels to list (0: all).")] = 0,
) -> None:
    """List the labels and metadata of a .rtv file."""
    import json

    from ramtag.data.vocab import load_vocab_features

    stored = load_vocab_features(path)
    typer.echo(f"labels: {len(stored.labels)}   features: {tuple(stored.features.shape)}   ramtag {stored.version}")
    typer.echo(f"templates: {json.dumps(stored.templates, ensure_ascii=False)}")
    typer.echo(f"fingerprint: {json.dumps(stored.fingerprint, ensure_ascii=False)}")
    shown = stored.labels if limit == 0 else stored.labels[:limit]
    for index, label in enumerate(shown):
        typer.echo(f"{index}\t{label}")
    if len(shown) < len(stored.labels):
        typer.echo(f"… {len(stored.labels) - len(shown)} more (use --limit 0)")
