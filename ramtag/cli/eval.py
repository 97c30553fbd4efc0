"""`ramtag eval`: ZSL/GZSL or multi-label metrics of a model (or a score table), baselines, calibration.

Parses the options; the run and its reports are ramtag.engine.eval.run's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ramtag.cli.app import app
from ramtag.cli.options import ModelChoice, command_line, model_options

_EPILOG = (
    "\nExamples:\n\n"
    "  ramtag eval test.json --checkpoint ram.safetensors --root /data/images --json report.json\n\n"
    "  ramtag eval coco_test_65.json --unseen unseen17.txt -c ram.safetensors --root /data/coco"
    " --map-prefix /mnt/nas/coco/trainval2014=val2014 --baseline --plots plots/\n\n"
    "  ramtag eval test.json --scores tags.parquet --root /data/images\n\n"
    "  ramtag eval val.jsonl --checkpoint ram.safetensors --calibrate thresholds.tsv --target-precision 0.8\n\n"
    "  torchrun --nproc-per-node 4 -m ramtag eval 'shards/val-{000..015}.tar' --labels all.txt -c ram.safetensors\n"
)

_HELP = (
    "Evaluate a model on labelled images: mAP, P/R/F1 at top-k, CP/CR/CF1, OP/OR/OF1, per-label AP.\n\n"
    "With [bold]--unseen[/bold], evaluates the paper's zero-shot (ZSL: unseen labels only, on images with an unseen"
    " label) and generalized zero-shot (GZSL: all labels) protocols.\n\n"
    "Results go to stdout, logs to stderr. Runs on many processes with torchrun; rank 0 writes the reports."
)

Data = Annotated[
    list[str],
    typer.Argument(
        metavar="DATA",
        help=(
            "An annotation file (reference JSON, JSONL manifest, COCO instances) or WebDataset shards with "
            ".json/.txt/.cls labels."
        ),
    ),
]
AllLabels = Annotated[
    Optional[str],
    typer.Option(
        "--labels",
        help=(
            "Every label, seen and unseen, one per line (default: the annotation file's class list, else the labels "
            "in the data). With --scores, when the table's metadata records no vocabulary: the table's labels in "
            "the order of its scores column."
        ),
    ),
]
Unseen = Annotated[
    Optional[Path],
    typer.Option("--unseen", help="Held-out labels: evaluate ZSL (unseen labels only) and GZSL (all labels)."),
]
Root = Annotated[
    Optional[Path],
    typer.Option("--root", help="Folder that relative image paths (and score-table keys) are relative to."),
]
MapPrefix = Annotated[
    Optional[list[str]],
    typer.Option("--map-prefix", metavar="OLD=NEW", help="Rewrite annotation paths starting with OLD (repeatable)."),
]
StrictLabels = Annotated[
    bool,
    typer.Option("--strict-labels", help="Labels outside the label space are an error instead of being dropped."),
]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
Workers = Annotated[
    Optional[int],
    typer.Option("--workers", "-j", min=0, help="Decoding processes (default: cores - 1, at most 8)."),
]
TopK = Annotated[
    Optional[list[int]],
    typer.Option("--top-k", "-k", help="k of the top-k metrics (repeatable; default 3 and 5)."),
]
JsonOut = Annotated[
    Optional[str],
    typer.Option("--json", metavar="OUT.json", help="Write the full report as JSON ('-' for stdout)."),
]
Markdown = Annotated[Optional[str], typer.Option("--markdown", metavar="OUT.md", help="Write a Markdown summary.")]
Plots = Annotated[
    Optional[Path],
    typer.Option("--plots", metavar="DIR", help="Write PNG plots here (needs the 'plots' extra: matplotlib)."),
]
Baseline = Annotated[
    bool,
    typer.Option("--baseline", help="Also score CLIP global ranking and training-free RAM on the same images."),
]
Calibrate = Annotated[
    Optional[Path],
    typer.Option(
        "--calibrate",
        metavar="THRESHOLDS.tsv",
        help="Fit per-label thresholds here, in the format `ramtag tag --thresholds` reads.",
    ),
]
TargetPrecision = Annotated[
    Optional[float],
    typer.Option(
        "--target-precision",
        help="With --calibrate: the lowest threshold reaching this precision (default: best F1).",
    ),
]
Scores = Annotated[
    Optional[Path],
    typer.Option(
        "--scores",
        metavar="TABLE",
        help="Evaluate a `ramtag tag --all-scores` table (Parquet or JSONL) instead of running a model.",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or warnings on stderr.")]


@app.command("eval", help=_HELP, epilog=_EPILOG)
@model_options
def eval_command(
    data: Data,
    labels: AllLabels = None,
    unseen: Unseen = None,
    root: Root = None,
    map_prefix: MapPrefix = None,
    strict_labels: StrictLabels = False,
    batch_size: BatchSize = 32,
    workers: Workers = None,
    top_k: TopK = None,
    json_out: JsonOut = None,
    markdown: Markdown = None,
    plots: Plots = None,
    baseline: Baseline = False,
    calibrate: Calibrate = None,
    target_precision: TargetPrecision = None,
    scores: Scores = None,
    quiet: Quiet = False,
    *,
    choice: ModelChoice,
) -> None:
    """`ramtag eval` (its --help is _HELP)."""
    from ramtag.engine.eval.run import EvalOutputs, read_label_list, run_eval
    from ramtag.engine.eval.types import EvalSettings
    from ramtag.errors import UsageError

    if target_precision is not None and calibrate is None:
        raise UsageError("--target-precision needs --calibrate THRESHOLDS.tsv")
    if scores is not None and choice.checkpoint is not None:
        raise UsageError("--scores evaluates a score table without a model: drop --checkpoint")
    outputs = EvalOutputs(
        json=json_out,
        markdown=markdown,
        plots=str(plots) if plots is not None else None,
        thresholds=str(calibrate) if calibrate is not None else None,
        command=command_line(),
    )
    outputs.check()  # before any label file is read from stdin or any model loads
    settings = EvalSettings(
        root=str(root) if root is not None else None,
        prefix_map=tuple(map_prefix or ()),
        labels=read_label_list(labels) if labels is not None else None,
        unseen=read_label_list(str(unseen)) if unseen is not None else None,
        strict_labels=strict_labels,
        ks=tuple(dict.fromkeys(top_k)) if top_k else (3, 5),
        batch_size=batch_size,
        workers=workers,
        baseline=baseline,
        calibrate=calibrate is not None,
        target_precision=target_precision,
    )
    run_eval(
        data,
        settings,
        outputs,
        load_model=None if scores is not None else lambda device: replace(choice, device=device).load(),
        scores=scores,
        device=choice.device,
        quiet=quiet,
    )
