"""`ramtag data synth`: the synthetic open-vocabulary benchmark, in every format ramtag reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ramtag.cli.app import app

data_app = typer.Typer(
    help="Datasets: generate the synthetic benchmark (smoke tests, demos, cluster checks).", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command(
    epilog=(
        "Examples:\n\n"
        "  ramtag data synth synth/ --n 2000 --seed 0\n\n"
        "A cluster smoke test, then tagging what was written:\n\n"
        "  ramtag data synth smoke/ --n 100000 --format webdataset --shard-size 1000\n\n"
        "  ramtag tag synth/images --labels synth/all.txt --model demo -o synth.parquet"
    )
)
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write into.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed writes the same bytes.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", min=16, max=2048, help="Image side in pixels.")] = 64,
    format: Annotated[
        Optional[List[str]],
        typer.Option("--format", help="images, json, jsonl, webdataset (repeatable).", show_default="all"),
    ] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Samples per WebDataset shard.")] = 1000,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier synthetic dataset in DIR.")
    ] = False,
) -> None:
    """Write N synthetic scenes (1-4 coloured shapes each) with labels, boxes, captions and a seen/unseen split."""
    from ramtag.data.synth_files import FORMATS, clear_dataset, write_dataset
    from ramtag.errors import OutputError

    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:  # mixing two seeds' files in one folder would be a silently wrong dataset
            raise OutputError(f"{out} is not empty; pass --overwrite to replace an earlier synthetic dataset there")
        clear_dataset(out)
    try:
        summary = write_dataset(
            out, n, seed, image_size=image_size, formats=set(format) if format else FORMATS, shard_size=shard_size
        )
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    from ramtag.cli.options import say

    say(f"{summary.n} scenes (seed {summary.seed}, {summary.image_size}px) -> {summary.out}")
    for line in _described_files(summary.files, out):
        say(line)


SYNTH_FILE_PURPOSES = {
    "images": "the scenes (PNG): ramtag tag DIR/images",
    "json": "annotations in the reference format (all, seen, unseen labels): ramtag train / eval",
    "jsonl": "one JSON line per image (path, labels, boxes, caption): a manifest for tag, train, eval",
    "webdataset": "WebDataset shards (png, json, idx): ramtag tag 'DIR/shards/*.tar'",
    "boxes": "object boxes per image (xyxy pixels)",
    "all": "every label, one a line: --labels",
    "seen": "labels to train on",
    "unseen": "held-out labels: train --unseen",
}
"""What each kind of file ``ramtag data synth`` writes is for, as it says after writing them."""


def _described_files(files: dict, out: Path) -> list[str]:
    lines = []
    for kind, paths in sorted(files.items()):
        names = sorted(str(path.relative_to(out)) for path in paths)
        if len(names) > 3:  # images and shards: one folder, many files
            shown = f"{Path(names[0]).parent}/ ({len(names)} files)"
        else:
            shown = ", ".join(names)
        lines.append(f"  {shown}: {SYNTH_FILE_PURPOSES.get(kind, kind)}".replace("DIR", str(out)))
    return lines
