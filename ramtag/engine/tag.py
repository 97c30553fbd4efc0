"""`ramtag tag`: stream inputs through RAM into a tag table, on one process or many (torchrun)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
from torch.utils.data import DataLoader

from ramtag import __version__
from ramtag.data.images import PIL_LIMIT
from ramtag.data.sources import FileDataset, InputPlan, ShardDataset, collate_records, plan_inputs
from ramtag.data.thresholds import read_thresholds
from ramtag.data.writers import TagBatch, TagTableWriter, attach_output, output_kind, prepare_output
from ramtag.engine import dist
from ramtag.engine.preflight import preflight_tag
from ramtag.engine.reporter import Progress
from ramtag.engine.runtime import Runtime
from ramtag.engine.signals import interrupted_run, worker_ignores_sigterm
from ramtag.engine.vocabulary import Vocabulary, load_vocabulary
from ramtag.errors import PartialFailure, UsageError
from ramtag.messages import one_line
from ramtag.selection import select_tags

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    return max(0, min(8, usable_cores() - 1))


@dataclass
class TagOptions:
    inputs: list[str]
    labels: str
    output: str = "tags.parquet"
    top_k: int = 5
    threshold: float | None = None
    thresholds_file: str | None = None
    all_scores: bool = False
    batch_size: int = 32
    workers: int | None = None
    precision: str = "fp32"
    resume: bool = False
    overwrite: bool = False
    retry_errors: bool = False
    path_column: str = "path"
    keep_columns: list[str] = field(default_factory=list)
    root: str | None = None
    max_pixels: int | None = PIL_LIMIT
    fast_decode: bool = False
    templates: list[str] = field(default_factory=list)
    quiet: bool = False
    save_maps: str | None = None
    part_rows: int = 262_144
    """Rows per part file: a killed run loses at most one unfinished part (and at most a minute of work)."""
    command_line: str = ""

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise UsageError("--top-k must be 0 (no limit) or more")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.threshold is not None and self.thresholds_file is not None:
            raise UsageError("--threshold and --thresholds exclude each other")
        if self.labels == "-" and "-" in self.inputs:
            raise UsageError("--labels - reads labels from stdin, which the image list '-' already uses")


@dataclass
class TagSummary:
    tagged: int
    failed: int
    seconds: float
    output: str | None
    skipped_done: int = 0

    @property
    def images_per_second(self) -> float:
        return (self.tagged + self.failed) / self.seconds if self.seconds > 0 else 0.0


def _share_cores_with_workers(runtime: Runtime, workers: int) -> None:
    """On the CPU, leave the decoding workers their cores: torch's spinning OpenMP threads otherwise fight
    them and small kernels slow down many times (benchmarks/README.md). OMP_NUM_THREADS still wins."""
    if runtime.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or workers == 0:
        return
    torch.set_num_threads(max(1, min(torch.get_num_threads(), usable_cores() - workers)))


def _plan(options: TagOptions, info: dist.DistInfo, stdin: TextIO | None, log) -> InputPlan:
    """Rank 0 lists the inputs (it alone may read stdin) and shares the plan."""
    plan = None
    problem = None
    if info.is_main:
        try:
            plan = plan_inputs(
                options.inputs,
                path_column=options.path_column,
                keep_columns=options.keep_columns,
                stdin=stdin,
                root=options.root,
                on_warning=lambda m: log(f"ramtag: warning: {m}"),
            )
        except Exception as error:  # shared so every rank stops with the same message
            problem = error
    plan, problem = dist.broadcast_object((plan, problem))
    if problem is not None:
        raise problem
    return plan


def _metadata(runtime: Runtime, vocabulary: Vocabulary, options: TagOptions, thresholds) -> dict:
    return {
        "ramtag_version": __version__,
        "vocabulary": vocabulary.labels,
        "vocabulary_fingerprint": vocabulary.fingerprint,
        "templates": vocabulary.templates,
        "model": runtime.source,
        "model_fingerprint": runtime.fingerprint,
        "kcot": runtime.config.kcot.__dict__,
        "top_k": options.top_k,
        "threshold": options.threshold,
        "thresholds_file": options.thresholds_file,
        "thresholds": None if thresholds is None else [float(t) for t in thresholds],
        "command_line": options.command_line,
    }


def _identity(vocabulary: Vocabulary, runtime: Runtime, options: TagOptions, thresholds) -> dict:
    return {
        "vocabulary_fingerprint": vocabulary.fingerprint,
        "model_fingerprint": runtime.fingerprint,
        "top_k": options.top_k,
        "threshold": options.threshold,
        "thresholds": None if thresholds is None else [float(t) for t in thresholds],
        "all_scores": options.all_scores,
        "keep_columns": list(options.keep_columns),
    }


def run_tag(options: TagOptions, runtime: Runtime, stdin: TextIO | None = None) -> TagSummary:
    """Tag every input once; raise PartialFailure (after writing the output) when some inputs failed."""
    info = dist.info()
    log = (lambda message: None) if options.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    if info.distributed and output_kind(options.output) == "stdout":
        raise UsageError("-o - (stdout) works with one process only; give an output file or folder")
    preflight_tag(options, is_main=info.is_main)
    vocabulary = load_vocabulary(runtime, options.labels, options.templates or None, stdin=stdin)
    thresholds = None
    if options.thresholds_file:
        thresholds = read_thresholds(options.thresholds_file).for_vocabulary(
            vocabulary.labels, vocabulary.fingerprint, runtime.fingerprint
        )
    plan = _plan(options, info, stdin, log)
    workers = default_workers() if options.workers is None else options.workers
    _share_cores_with_workers(runtime, workers)
    problem = plan.shard_split_problem(info.world_size, workers)
    if problem and info.is_main:
        log(f"ramtag: warning: {problem}")

    map_writer = None
    if options.save_maps:  # before the output is prepared: an unwritable maps folder leaves nothing behind
        from ramtag.engine.explain import MapWriter

        pre = runtime.config.preprocessing
        map_writer = MapWriter(options.save_maps, vocabulary.labels, pre.mean, pre.std)

    layout = None
    if info.is_main:
        layout = prepare_output(
            options.output,
            resume=options.resume,
            overwrite=options.overwrite,
            identity=_identity(vocabulary, runtime, options, thresholds),
        )
    dist.barrier()
    if not info.is_main:
        layout = attach_output(options.output)
    done = layout.finished_keys(retry_errors=options.retry_errors) if (layout is not None and options.resume) else set()
    if done:
        plan = plan.without_keys(done)
    transform = runtime.transform()
    draft = runtime.config.preprocessing.image_size if options.fast_decode else None
    files = FileDataset(
        plan.files_for_rank(info.rank, info.world_size), transform, max_pixels=options.max_pixels, draft_size=draft
    )
    shards = ShardDataset(
        plan.shards,
        transform,
        rank=info.rank,
        world_size=info.world_size,
        skip_keys=done,
        max_pixels=options.max_pixels,
        draft_size=draft,
    )
    pin = runtime.device.type == "cuda"
    loaders = []
    if len(files):
        loaders.append(
            DataLoader(
                files,
                batch_size=options.batch_size,
                num_workers=workers,
                collate_fn=collate_records,
                pin_memory=pin,
                worker_init_fn=worker_ignores_sigterm,
            )
        )
    if plan.shards:
        loaders.append(
            DataLoader(
                shards,
                batch_size=options.batch_size,
                num_workers=min(workers, max(1, len(shards.shards[info.rank :: info.world_size]))) if workers else 0,
                collate_fn=collate_records,
                pin_memory=pin,
                worker_init_fn=worker_ignores_sigterm,
            )
        )

    metadata = _metadata(runtime, vocabulary, options, thresholds)
    writer = TagTableWriter(
        layout,
        vocabulary.labels,
        metadata=metadata,
        all_scores=options.all_scores,
        extra_schema=plan.extra_schema,
        rank=info.rank,
        stdout=sys.stdout if layout is None else None,
        row_group_rows=min(16_384, options.part_rows),
        rows_per_part=options.part_rows,
    )
    total = plan.files.num_rows if not plan.shards else None
    progress = Progress(total if info.world_size == 1 else None, "tagging", quiet=options.quiet or not info.is_main)
    autocast = PRECISIONS[options.precision]
    label_features = vocabulary.features.to(runtime.device)
    tagged = failed = 0
    started = time.perf_counter()
    interrupted = False
    try:
        for loader in loaders:
            for batch in loader:
                if batch.failed_keys:
                    for key, error in zip(batch.failed_keys, batch.failed_errors):
                        line = one_line(f"ramtag: {key}: {error}")  # a key may hold a newline
                        if info.is_main:
                            progress.log(line)
                        elif not options.quiet:  # each rank reports its own inputs; the bar is rank 0's
                            print(line, file=sys.stderr, flush=True)
                    writer.write(
                        TagBatch.from_failures(
                            batch.failed_keys, batch.failed_sources, batch.failed_errors, batch.failed_extra
                        )
                    )
                    failed += len(batch.failed_keys)
                if batch.images is not None:
                    output = runtime.score(batch.images, label_features, autocast)
                    scores = output.scores.float()
                    selection = select_tags(
                        scores, top_k=options.top_k, threshold=options.threshold, per_label=thresholds
                    )
                    writer.write(
                        TagBatch.from_selection(
                            batch.keys,
                            batch.sources,
                            selection,
                            scores.cpu().numpy() if options.all_scores else None,
                            batch.extra,
                        )
                    )
                    if map_writer is not None:
                        map_writer.write(batch.keys, batch.images, output, selection)
                    tagged += len(batch.keys)
                progress.advance(len(batch), len(batch.failed_keys))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
        writer.close()
    if interrupted:
        raise interrupted_run(layout is not None, writer.rows_written)
    dist.barrier()
    counts = dist.all_gather_objects((tagged, failed))
    tagged, failed = sum(c[0] for c in counts), sum(c[1] for c in counts)
    final = None
    if info.is_main:
        final = writer.finalize(info.world_size)
    dist.barrier()
    summary = TagSummary(
        tagged, failed, time.perf_counter() - started, str(final) if final else None, skipped_done=len(done)
    )
    if info.is_main and not options.quiet:
        where = f" -> {summary.output}" if summary.output else ""
        resumed = f", {summary.skipped_done} already done" if summary.skipped_done else ""
        log(
            f"ramtag: tagged {summary.tagged} images, {summary.failed} failed{resumed}, "
            f"{summary.images_per_second:.1f} img/s{where}"
        )
    if failed:
        raise PartialFailure(f"{failed} input(s) could not be tagged; see the error column of the output")
    earlier = _error_rows(summary.output) if (done and info.is_main and summary.output) else 0
    if earlier:
        raise PartialFailure(
            f"{earlier} input(s) in {summary.output} failed in an earlier run; --resume --retry-errors tries them again"
        )
    return summary


def _error_rows(path: str) -> int:
    """Rows of a finished output that carry an error (what the exit status reports after a resume)."""
    import json

    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    if path.endswith((".jsonl", ".ndjson")):
        with open(path, encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip() and json.loads(line).get("error") is not None)
    column = ds.dataset(path, format="parquet").to_table(columns=["error"]).column("error")
    return int(pc.sum(pc.is_valid(column)).as_py() or 0)
