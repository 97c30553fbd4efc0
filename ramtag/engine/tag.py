"""`ramtag tag`: stream inputs through RAM into a tag table, on one process or many (torchrun)."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader

from ramtag import __version__
from ramtag.data.assemble import write_label_file
from ramtag.data.images import PIL_LIMIT
from ramtag.data.layout import output_kind
from ramtag.data.rows import TagBatch
from ramtag.data.shards import shard_split_problem
from ramtag.data.thresholds import read_thresholds
from ramtag.data.units import UNIT_ROWS, UnitDataset, collate_unit_records
from ramtag.engine import dist
from ramtag.engine.device_feed import DECODES, HostScores, decode_transform, device_batches
from ramtag.engine.output import InputOptions, RunOutput
from ramtag.engine.preflight import preflight_tag
from ramtag.engine.reporter import ImageProgress
from ramtag.engine.runtime import PRECISIONS, Runtime, autocast_dtype, default_batch_size
from ramtag.engine.sidecars import SidecarOptions, SidecarStage
from ramtag.engine.signals import decode_worker_init, interrupted_run
from ramtag.engine.summary import RunTally, TagSummary, conclude, error_row_line, stderr_log
from ramtag.engine.vocabulary import Vocabulary, load_vocabulary
from ramtag.errors import OutputError, UsageError
from ramtag.selection import select_tags


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
    batch_size: int | None = None
    """None: the device's default (runtime.DEFAULT_BATCH_SIZES)."""
    workers: int | None = None
    precision: str = "auto"
    """auto: bf16 autocast on CUDA devices that support it, else fp16; fp32 on CPU (runtime.autocast_dtype)."""
    resume: bool = False
    overwrite: bool = False
    retry_errors: bool = False
    path_column: str = "path"
    keep_columns: list[str] = field(default_factory=list)
    root: str | None = None
    max_pixels: int | None = PIL_LIMIT
    fast_decode: bool = False
    compile: bool = False
    """Run the image forward through torch.compile at the run's batch size (ramtag.engine.compiled): a start-up
    cost that long runs win back; a failure to compile warns once and the run goes on uncompiled."""
    decode: str = "auto"
    """Where JPEGs are decoded: cpu (PIL, in the workers), gpu (batched on the model's device; other files and
    JPEGs it refuses still decode on the CPU) or auto (gpu on CUDA devices, else cpu)."""
    templates: list[str] = field(default_factory=list)
    quiet: bool = False
    save_maps: str | None = None
    part_rows: int = 262_144
    """Rows per part file: a killed run loses at most one unfinished part (and at most a minute of work)."""
    unit_rows: int = UNIT_ROWS
    """Rows of the file listing per work unit (fewer for short listings, so that every worker gets units)."""
    allow_empty: bool = False
    """Write an empty table when the inputs hold no image, instead of refusing the run."""
    image_column: str | None = None
    """Parquet/Arrow inputs hold their images in this column (binary or the Hugging Face image struct)."""
    key_column: str | None = None
    """The row key column of those tables (default: the struct's path, else FILE:ROW)."""
    command_line: str = ""
    sidecars: SidecarOptions = field(default_factory=SidecarOptions)
    """Caption .txt / XMP files written beside the images (or under a folder by key) as rows are tagged."""
    labels_out: str | None = None
    """Also write the vocabulary, one label per line in ``scores`` order, to this file (for ``-o -``)."""

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise UsageError("--top-k must be 0 (no limit) or more")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.decode not in DECODES:
            raise UsageError(f"--decode must be one of {', '.join(DECODES)}")
        if self.threshold is not None and self.thresholds_file is not None:
            raise UsageError("--threshold and --thresholds exclude each other")
        if self.labels == "-" and "-" in self.inputs:
            raise UsageError("--labels - reads labels from stdin, which the image list '-' already uses")
        if self.key_column and not self.image_column:
            raise UsageError("--key-column names the key column of tables read with --image-column")


def _share_cores_with_workers(runtime: Runtime, workers: int) -> None:
    """On the CPU, leave the decoding workers their cores: torch's spinning OpenMP threads otherwise fight
    them and small kernels slow down many times (benchmarks/README.md). OMP_NUM_THREADS still wins."""
    if runtime.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or workers == 0:
        return
    torch.set_num_threads(max(1, min(torch.get_num_threads(), usable_cores() - workers)))


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


def resume_after_restart(options: TagOptions, *, is_main: bool) -> TagOptions:
    """Under ``torchrun --max-restarts``, a restarted group continues from the ledger as if --resume were given
    (and --overwrite, which the first start already did, no longer applies): the failed start's committed
    units stay done, and only its units in flight are redone. Says so in one line, on rank 0."""
    restart = dist.restart_count()
    if not restart or options.resume or output_kind(options.output) == "stdout":  # stdout keeps no ledger
        return options
    if is_main and not options.quiet:
        print(
            f"ramtag: torchrun restart {restart}: resuming {options.output} from its ledger, as --resume does",
            file=sys.stderr,
            flush=True,
        )
    return replace(options, resume=True, overwrite=False)


def input_options(options: TagOptions) -> InputOptions:
    """What the run lists, from the tag options (every driver plans the same units)."""
    return InputOptions(
        options.inputs,
        path_column=options.path_column,
        keep_columns=options.keep_columns,
        root=options.root,
        unit_rows=options.unit_rows,
        allow_empty=options.allow_empty,
        image_column=options.image_column,
        key_column=options.key_column,
    )


def open_vocabulary(
    options: TagOptions, runtime: Runtime, stdin: TextIO | None, *, is_main: bool
) -> tuple[Vocabulary, np.ndarray | None]:
    """The vocabulary (encoded) and the per-label thresholds; ``--labels-out`` is written here, before any row,
    so that a consumer of stdout can read it first."""
    vocabulary = load_vocabulary(runtime, options.labels, options.templates or None, stdin=stdin)
    thresholds = None
    if options.thresholds_file:
        thresholds = read_thresholds(options.thresholds_file).for_vocabulary(
            vocabulary.labels, vocabulary.fingerprint, runtime.fingerprint
        )
    if options.labels_out and is_main:
        try:
            write_label_file(options.labels_out, vocabulary.labels)
        except OSError as error:
            raise OutputError(f"--labels-out {options.labels_out}: {error.strerror or error}") from None
    return vocabulary, thresholds


def run_tag(options: TagOptions, runtime: Runtime, stdin: TextIO | None = None) -> TagSummary:
    """Tag every input once; raise PartialFailure (after writing the output) when the output holds error rows."""
    info = dist.info()
    log = stderr_log(options.quiet)
    if info.distributed and output_kind(options.output) == "stdout":
        raise UsageError("-o - (stdout) works with one process only; give an output file or folder")
    options = resume_after_restart(options, is_main=info.is_main)
    preflight_tag(options, is_main=info.is_main)
    vocabulary, thresholds = open_vocabulary(options, runtime, stdin, is_main=info.is_main)
    workers = default_workers() if options.workers is None else options.workers
    batch_size = options.batch_size or default_batch_size(runtime.device)
    _share_cores_with_workers(runtime, workers)

    map_writer = None
    if options.save_maps:  # before the output is prepared: an unwritable maps folder leaves nothing behind
        from ramtag.engine.explain import MapWriter

        pre = runtime.config.preprocessing
        map_writer = MapWriter(options.save_maps, vocabulary.labels, pre.mean, pre.std)

    output = RunOutput.open(
        options.output,
        input_options(options),
        resume=options.resume,
        overwrite=options.overwrite,
        retry_errors=options.retry_errors,
        identity=_identity(vocabulary, runtime, options, thresholds),
        stdin=stdin,
        workers=workers,
        log=log,
    )
    shard_units = sum(1 for task in output.tasks if task.unit.kind == "shard")
    problem = shard_split_problem(shard_units, info.world_size, workers)
    if problem and info.is_main:
        log(f"ramtag: warning: {problem}")
    claims = output.claim(workers)
    mine = claims.tasks
    draft = runtime.config.preprocessing.image_size if options.fast_decode else None
    transform = decode_transform(options.decode, runtime.device, runtime.transform(), runtime.config.preprocessing)
    units = UnitDataset(
        mine,
        output.work_dir,
        output.listing,
        transform,
        max_pixels=options.max_pixels,
        draft_size=draft,
        claim=claims.claim,
    )
    loader = DataLoader(
        units,
        batch_size=batch_size,
        num_workers=min(workers, len(mine)),
        collate_fn=collate_unit_records,
        pin_memory=runtime.device.type == "cuda",
        worker_init_fn=decode_worker_init,
        # batches as workers finish them: in order, a worker on a big unit would stall the others' batches
        # (and so their claims) behind it. Each worker's batches still come in its order, so a unit's end
        # follows its rows.
        in_order=False,
    )
    metadata = _metadata(runtime, vocabulary, options, thresholds)
    writer = output.writer(
        vocabulary.labels, metadata, all_scores=options.all_scores, rank=info.rank, part_rows=options.part_rows
    )
    total = output.pending_rows() if info.world_size == 1 else None
    progress = ImageProgress(total, "tagging", quiet=options.quiet or not info.is_main)
    autocast = autocast_dtype(options.precision, runtime.device)
    label_features = vocabulary.features.to(runtime.device)
    vision = None
    if options.compile:  # a run shorter than one batch compiles for its own size, not pads to the full one
        compiled_size = batch_size if total is None else max(1, min(batch_size, total))
        vision = runtime.compiled_vision(compiled_size, progress.log if info.is_main else log)
    sidecars = None
    if options.sidecars.enabled:
        warn = progress.log if info.is_main else log
        sidecars = SidecarStage(options.sidecars, warn=warn, listing=output.listing)
    tagged = failed = 0
    first_failure = None  # named when every input fails: usually one wrong folder for all of them
    started = time.perf_counter()
    interrupted = False
    batches = device_batches(
        loader if mine else (), runtime.device, transform, max_pixels=options.max_pixels, draft_size=draft
    )
    try:
        for batch in batches:
            if batch.failed_keys:
                first_failure = first_failure or f"{batch.failed_sources[0]}: {batch.failed_errors[0]}"
                for key, source, error in zip(batch.failed_keys, batch.failed_sources, batch.failed_errors):
                    line = error_row_line(key, source, error)
                    if info.is_main:
                        progress.log(line)
                    elif not options.quiet:  # each rank reports its own inputs; the bar is rank 0's
                        print(line, file=sys.stderr, flush=True)
                writer.write(
                    TagBatch.from_failures(
                        batch.failed_keys, batch.failed_sources, batch.failed_errors, batch.failed_extra
                    ),
                    batch.failed_units,
                )
                failed += len(batch.failed_keys)
            if batch.images is not None:
                scored = runtime.score(batch.images, label_features, autocast, vision)
                scores = HostScores(scored.scores.float()).wait()  # on the CPU, the model's own tensor
                selection = select_tags(scores, top_k=options.top_k, threshold=options.threshold, per_label=thresholds)
                writer.write(
                    TagBatch.from_selection(
                        batch.keys,
                        batch.sources,
                        selection,
                        scores.numpy() if options.all_scores else None,
                        batch.extra,
                    ),
                    batch.units,
                )
                if map_writer is not None:
                    map_writer.write(batch.keys, batch.images, scored, selection)
                if sidecars is not None:  # before the unit commits: see ramtag.engine.sidecars on resuming
                    sidecars.write_selection(batch.keys, batch.sources, selection, vocabulary.labels)
                tagged += len(batch.keys)
            for end in batch.ended:  # after its rows: the writer commits a unit once they are written
                writer.commit(end)
            progress.advance(len(batch), len(batch.failed_keys))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        batches.close()  # stops the device-decode feeder thread, if any, before the output is closed
        progress.close()
        try:
            writer.close()
        finally:
            if interrupted:
                output.release()
    if interrupted:
        raise interrupted_run(output.kind != "stdout", output.done_rows + writer.rows_written)
    dist.barrier()
    counts = dist.all_gather_objects((tagged, failed, sidecars.counts() if sidecars else None))
    tagged, failed = sum(c[0] for c in counts), sum(c[1] for c in counts)
    sidecar_counts = sum((c[2] for c in counts if c[2] is not None), Counter())
    final, problem = None, None
    if info.is_main:
        try:
            final = output.finalize(metadata, all_scores=options.all_scores, failed_now=failed)
        except Exception as error:  # every rank stops with rank 0's message
            problem = error
    final, problem = dist.broadcast_object((final, problem))
    if problem is not None:
        raise problem
    tally = RunTally(
        tagged,
        failed,
        first_failure,
        sidecar_counts if sidecars is not None else None,
        sidecars.first_failure if sidecars is not None else None,
    )
    return conclude(
        tally,
        final,
        time.perf_counter() - started,
        output.done_rows,
        quiet=options.quiet,
        log=log if info.is_main else lambda message: None,
    )
