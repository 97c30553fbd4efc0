"""`ramtag eval`: ZSL/GZSL or multi-label metrics of a model (or a score table), baselines, calibration."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ramtag.cli.app import app
from ramtag.cli.options import (
    Checkpoint,
    Device,
    ModelChoice,
    ModelName,
    OtMaxIter,
    OtReg,
    OtStop,
    OtTol,
    Pretrained,
    ScaleLocalTemperature,
    command_line,
)

_EPILOG = """
Examples:

  ramtag eval test.json --checkpoint ram.safetensors --root /data/images --json report.json

  ramtag eval coco_test_65.json --unseen unseen17.txt -c ram.safetensors --root /data/coco --map-prefix /mnt/nas/coco/trainval2014=val2014 --baseline --plots plots/

  ramtag eval test.json --scores tags.parquet --root /data/images

  ramtag eval val.jsonl --checkpoint ram.safetensors --calibrate thresholds.tsv --target-precision 0.8

  torchrun --nproc-per-node 4 -m ramtag eval 'shards/val-{000..015}.tar' --labels all.txt -c ram.safetensors
"""


@app.command("eval", epilog=_EPILOG)
def eval_command(
    data: Annotated[list[str], typer.Argument(metavar="DATA", help="An annotation file (reference JSON, JSONL manifest, COCO instances) or WebDataset shards with .json/.txt/.cls labels.")],
    labels: Annotated[Optional[str], typer.Option("--labels", help="Every label, seen and unseen, one per line (default: the annotation file's class list, else the labels in the data).")] = None,
    unseen: Annotated[Optional[Path], typer.Option("--unseen", help="Held-out labels: evaluate ZSL (unseen labels only) and GZSL (all labels).")] = None,
    root: Annotated[Optional[Path], typer.Option("--root", help="Folder that relative image paths (and score-table keys) are relative to.")] = None,
    map_prefix: Annotated[Optional[list[str]], typer.Option("--map-prefix", metavar="OLD=NEW", help="Rewrite annotation paths starting with OLD (repeatable).")] = None,
    strict_labels: Annotated[bool, typer.Option("--strict-labels", help="Labels outside the label space are an error instead of being dropped.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 32,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=0, help="Decoding processes (default: cores - 1, at most 8).")] = None,
    top_k: Annotated[Optional[list[int]], typer.Option("--top-k", "-k", help="k of the top-k metrics (repeatable; default 3 and 5).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", metavar="OUT.json", help="Write the full report as JSON ('-' for stdout).")] = None,
    markdown: Annotated[Optional[str], typer.Option("--markdown", metavar="OUT.md", help="Write a Markdown summary.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", metavar="DIR", help="Write PNG plots here (needs the 'plots' extra: matplotlib).")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also score CLIP global ranking and training-free RAM on the same images.")] = False,
    calibrate: Annotated[Optional[Path], typer.Option("--calibrate", metavar="THRESHOLDS.tsv", help="Fit per-label thresholds here, in the format `ramtag tag --thresholds` reads.")] = None,
    target_precision: Annotated[Optional[float], typer.Option("--target-precision", help="With --calibrate: the lowest threshold reaching this precision (default: best F1).")] = None,
    scores: Annotated[Optional[Path], typer.Option("--scores", metavar="TABLE", help="Evaluate a `ramtag tag --all-scores` table (Parquet or JSONL) instead of running a model.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or warnings on stderr.")] = False,
    checkpoint: Checkpoint = None,
    model: ModelName = "ViT-B-16-quickgelu",
    pretrained: Pretrained = "openai",
    device: Device = "auto",
    scale_local_temperature: ScaleLocalTemperature = None,
    ot_reg: OtReg = None,
    ot_max_iter: OtMaxIter = None,
    ot_tol: OtTol = None,
    ot_stop: OtStop = None,
) -> None:
    """Evaluate a model on labelled images: mAP, P/R/F1 at top-k, CP/CR/CF1, OP/OR/OF1, per-label AP.

    With [bold]--unseen[/bold], evaluates the paper's zero-shot (ZSL: unseen labels only, on images with an unseen label) and generalized zero-shot (GZSL: all labels) protocols.

    Results go to stdout, logs to stderr. Runs on many processes with torchrun; rank 0 writes the reports.
    """
    from rich.console import Console

    from ramtag.engine import dist
    from ramtag.engine.calibrate import write_calibration
    from ramtag.engine.eval_protocol import EvalSettings
    from ramtag.engine.evaluate import evaluate_model
    from ramtag.engine.score_table import evaluate_score_table
    from ramtag.engine.report import (
        calibration_summary,
        calibration_table,
        markdown_summary,
        report_dict,
        results_table,
        write_json_report,
        write_markdown,
        write_plots,
    )
    from ramtag.errors import UsageError

    if target_precision is not None and calibrate is None:
        raise UsageError("--target-precision needs --calibrate THRESHOLDS.tsv")
    if json_out == "-" and markdown == "-":
        raise UsageError("only one of --json and --markdown can go to stdout ('-')")
    for option, target in (("--json", json_out), ("--markdown", markdown), ("--calibrate", calibrate)):
        if target is not None and str(target) != "-" and Path(target).is_dir():  # found out now, not after the run
            raise UsageError(f"{option} {target}: a folder; give a file name")
    if plots is not None and plots.exists() and not plots.is_dir():
        raise UsageError(f"--plots {plots}: a file; give a folder")
    if scores is not None and checkpoint is not None:
        raise UsageError("--scores evaluates a score table without a model: drop --checkpoint")
    settings = EvalSettings(
        root=str(root) if root is not None else None,
        prefix_map=tuple(map_prefix or ()),
        labels=tuple(_read_label_list(labels)) if labels is not None else None,
        unseen=tuple(_read_label_list(str(unseen))) if unseen is not None else None,
        strict_labels=strict_labels,
        ks=tuple(dict.fromkeys(top_k)) if top_k else (3, 5),
        batch_size=batch_size,
        workers=workers,
        baseline=baseline,
        calibrate=calibrate is not None,
        target_precision=target_precision,
    )
    info = dist.setup(device) if scores is None else dist.DistInfo(0, 1, 0)
    try:
        errors = Console(stderr=True, quiet=quiet or not info.is_main, soft_wrap=True)

        def log(message: str) -> None:
            errors.print(f"warning: {message}", style="yellow", markup=False, highlight=False)

        if scores is not None:
            result = evaluate_score_table(scores, data, settings, log=log)
        else:
            choice = ModelChoice(checkpoint, model, pretrained, dist.device_for(info, device), scale_local_temperature, ot_reg, ot_max_iter, ot_tol, ot_stop)
            runtime = choice.load()
            with _progress(errors) as progress:
                result = evaluate_model(runtime, data, settings, log=log, progress=progress)
        if result is None:  # not rank 0
            return
        plot_files: list[str] = []
        if plots is not None:
            outcome = write_plots(result, plots)
            plot_files = outcome.files
            if outcome.note:
                result.notes.append(outcome.note)
                log(outcome.note)
        if calibrate is not None and result.calibration is not None:
            write_calibration(calibrate, result.calibration)
            errors.print(f"thresholds written to {calibrate}", markup=False, highlight=False)
        out = Console(file=sys.stderr if json_out == "-" or markdown == "-" else sys.stdout, width=_width())
        out.print(results_table(result))
        if result.calibration is not None:
            out.print(calibration_table(result.calibration))
            errors.print(calibration_summary(result.calibration), markup=False, highlight=False)
        if json_out is not None:
            write_json_report(json_out, report_dict(result, command=command_line(), plots=plot_files))
        if markdown is not None:
            relative = Path(markdown).parent if markdown != "-" else None
            write_markdown(markdown, markdown_summary(result, plots=plot_files, plots_note=_plots_note(result), relative_to=relative))
        missed = result.images_not_evaluated()
        if missed:
            from ramtag.errors import PartialFailure

            raise PartialFailure(f"{missed} annotated image(s) could not be evaluated (see the warnings and the report); the metrics leave them out")
    finally:
        dist.teardown()


def _width() -> int | None:
    return None if sys.stdout.isatty() else 160


def _plots_note(result) -> str | None:
    from ramtag.engine.report import PLOTS_SKIPPED

    return PLOTS_SKIPPED if PLOTS_SKIPPED in result.notes else None


def _read_label_list(path: str) -> list[str]:
    from ramtag.data.vocab import read_labels

    if path == "-":
        return read_labels(sys.stdin).labels
    return read_labels(path).labels


class _progress:
    """A rich progress display on an interactive stderr; nothing otherwise."""

    def __init__(self, console) -> None:
        self.console = console
        self.display = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if self.console.quiet or not self.console.is_terminal:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=self.console, transient=True)
        self.display.start()
        return self.update

    def update(self, protocol: str, done: int, total: int | None) -> None:
        if protocol not in self.tasks:
            self.tasks[protocol] = self.display.add_task(f"scoring ({protocol})", total=total)
        self.display.update(self.tasks[protocol], completed=done)

    def __exit__(self, *exc_info) -> None:
        if self.display is not None:
            self.display.stop()
