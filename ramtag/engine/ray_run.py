"""`ramtag tag --ray ADDRESS`: the same run of work units as the plain path, executed by Ray Data.

The driver (the process that runs ``ramtag tag``) plans the units with :class:`~ramtag.engine.output.RunOutput`
exactly as one process would: same listing, ledger, identity check and ``--resume``. Ray Data then runs over a
dataset of the pending units' descriptors (``ray.data.from_items``, one block per unit):

1. ``map_batches(decode_units)``: CPU tasks (``--ray-cpus-per-task``) read each unit with ramtag's own unit
   reader, so every input keeps its row and a bad image becomes an error row (Ray's own readers would drop it).
2. ``map_batches(Scorer, compute=ActorPoolStrategy(MIN, MAX), num_gpus=…)``: an autoscaling actor pool that loads the
   model once per actor and scores the decoded rows.
3. The driver consumes the result stream, writes each row to its unit's part files (and, with ``--sidecars``,
   the row's sidecars), and commits a unit to the ledger once all of its rows (counted by the unit's end
   marker) are written. The summary and the exit status are one process's (:mod:`ramtag.engine.summary`).

Committing on the driver, not in the actors, keeps exactly-once simple: a task that Ray retries (a killed
actor, a lost node) sends rows again, and the driver drops every ``(unit, seq)`` it has already written; a
killed driver leaves uncommitted parts that ``--resume`` keeps or redoes as it does for the plain path. A
killed actor therefore loses only the batches it held; Ray restarts it and retries them (Ray Data's actor
pools retry by default). Ray's own backpressure bounds what is in flight between the stages.

Every node must see the output's work directory (the listing, the kept parts) and the images at the same
paths, as torchrun nodes must: a shared filesystem (NFS, FSx, a Kubernetes volume).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ramtag.data.rows import TagBatch
from ramtag.engine.output import RunOutput
from ramtag.engine.preflight import preflight_tag
from ramtag.engine.ray_stages import RuntimeSpec, Scorer, decode_units, describe_task
from ramtag.engine.reporter import ImageProgress
from ramtag.engine.runtime import Runtime, default_batch_size
from ramtag.engine.sidecars import SidecarStage
from ramtag.engine.signals import interrupted_run
from ramtag.engine.summary import RunTally, TagSummary, conclude, error_row_line, stderr_log
from ramtag.engine.tag import TagOptions, _identity, _metadata, input_options, open_vocabulary
from ramtag.errors import OutputError, UsageError
from ramtag.messages import one_line

RAY_MISSING = "--ray needs Ray, which this install lacks: pip install 'ramtag[ray]'"
SAVE_MAPS_ON_RAY = (
    "--save-maps works without --ray only: the maps are the model's per-region scores, which stay in the Ray "
    "actors (only the selected tags travel back to the driver)"
)
DECODE_BLOCK_ROWS = 256
"""Rows per table a decode task yields: a unit of 16k rows streams to the actors in pieces."""


def _first_line(error: BaseException) -> str:
    """Ray's errors carry the remote traceback; the cause's last line says what happened."""
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return one_line(lines[-1] if lines else type(cause).__name__)


def require_ray() -> None:
    """Raise one clear line where Ray (Ray Data) is not installed; call it before any model loads."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(RAY_MISSING) from None


def parse_actors(text: str) -> tuple[int, int]:
    """``--ray-actors``: ``N`` (a fixed pool) or ``MIN:MAX`` (an autoscaling one)."""
    low, _, high = text.partition(":")
    try:
        bounds = (int(low), int(high if high else low))
    except ValueError:
        raise UsageError(f"--ray-actors must be N or MIN:MAX (whole numbers), not {text!r}") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise UsageError(f"--ray-actors {text}: need 1 <= MIN <= MAX")
    return bounds


@dataclass(frozen=True)
class RayOptions:
    address: str
    """``auto`` (join the cluster ``ray start`` made), ``local`` (start one in this process), or an address."""
    cpus_per_task: float = 1.0
    """CPUs of each decoding task."""
    gpus_per_actor: float | None = None
    """GPUs of each model actor; None: 1 where the cluster has GPUs, else 0."""
    actors: tuple[int, int] | None = None
    """Actor pool bounds; None: 1 to (cluster GPUs / GPUs per actor), or 1 on a cluster without GPUs."""
    init_kwargs: dict = field(default_factory=dict)
    """Extra ``ray.init`` arguments (a runtime_env, num_cpus for ``local``)."""

    def __post_init__(self) -> None:
        if not self.address:
            raise UsageError("--ray needs an address: auto, local, or the cluster's address")
        if self.cpus_per_task <= 0:
            raise UsageError("--ray-cpus-per-task must be more than 0")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise UsageError("--ray-gpus-per-actor must be 0 or more")


def connect(options: RayOptions, quiet: bool) -> bool:
    """Join or start Ray; returns whether this call started the session (and so shuts it down)."""
    import ray

    if ray.is_initialized():  # a caller (a notebook, a test) already holds a session: use it
        return False
    arguments = {"logging_level": logging.WARNING, "log_to_driver": not quiet, **options.init_kwargs}
    if options.address != "local":
        arguments["address"] = options.address
    ray.init(**arguments)
    return True


def _pool(options: RayOptions, resources: dict) -> tuple[float, tuple[int, int]]:
    gpus = resources.get("GPU", 0.0)
    per_actor = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if options.actors is not None:
        return per_actor, options.actors
    most = max(1, int(gpus // per_actor)) if per_actor else 1
    return per_actor, (1, most)


def _actor_device(spec: RuntimeSpec, gpus_per_actor: float) -> RuntimeSpec:
    """An actor without a GPU share runs on the CPU (``auto`` would take a GPU Ray did not give it)."""
    if spec.device != "auto":
        return spec
    return RuntimeSpec(spec.checkpoint, spec.model, spec.pretrained, "cuda" if gpus_per_actor else "cpu",
                       dict(spec.overrides))


def _decode_task_memory(image_size: int) -> int:
    """Bytes a decoding task holds at most: two tables of decoded float32 images, and a worker process with
    torch imported (~400 MiB; Ray's memory check measures the whole worker)."""
    return 2 * DECODE_BLOCK_ROWS * 3 * image_size * image_size * 4 + 512 * 2**20


def _quiet_ray_data(context) -> None:
    """ramtag reports progress itself; Ray's bars would interleave with it (Ray still logs to its session folder)."""
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


class _UnitCollector:
    """The driver's end of the stream: rows into part files, each unit committed once all its rows are written."""

    def __init__(self, writer, progress: ImageProgress, all_scores: bool, labels: Sequence[str],
                 sidecars: SidecarStage | None = None) -> None:
        self.writer, self.progress, self.all_scores, self.labels = writer, progress, all_scores, labels
        self.sidecars = sidecars
        """Written here, on the driver, for the rows it keeps, before their unit commits: a row that a retried
        task sends again is dropped before it gets a sidecar, and a resumed run redoes exactly the sidecars of
        the units it redoes, as on one process (see :mod:`ramtag.engine.sidecars`)."""
        self.seen: dict[int, set[int]] = {}
        self.ends: dict[int, tuple] = {}
        self.tagged = self.failed = self.duplicates = 0
        self.first_failure: str | None = None

    def take(self, table: pa.Table) -> None:
        columns = {name: table[name].to_pylist() for name in ("unit", "seq", "end")}
        keep = []
        for index, (unit, seq, end) in enumerate(zip(columns["unit"], columns["seq"], columns["end"])):
            if end:
                import pickle

                self.ends.setdefault(unit, pickle.loads(end))
                continue
            seen = self.seen.setdefault(unit, set())
            if seq in seen:  # a retried task sent this row again
                self.duplicates += 1
                continue
            seen.add(seq)
            keep.append(index)
        if keep:
            self._write(table.take(pa.array(keep, pa.int64())))
        for unit in [unit for unit in self.ends if len(self.seen.get(unit, ())) == self.ends[unit][1]]:
            end, _ = self.ends.pop(unit)
            self.seen.pop(unit, None)
            self.writer.commit(end)  # queued after the unit's rows: the writer commits once they are written

    def _write(self, table: pa.Table) -> None:
        import pickle

        keys, errors = table["key"].to_pylist(), table["error"].to_pylist()
        tag_labels = table["tag_labels"].to_pylist()
        counts = np.array([len(row) for row in tag_labels], dtype=np.int64)
        extras = [pickle.loads(blob) for blob in table["extra"].to_pylist()]
        names = sorted({name for extra in extras for name in extra})
        scores = None
        if self.all_scores:
            scores = np.zeros((len(keys), len(self.labels)), dtype=np.float32)
            for row, values in enumerate(table["scores"].to_pylist()):
                if values:
                    scores[row] = values
        batch = TagBatch(
            keys=keys,
            sources=table["source"].to_pylist(),
            errors=errors,
            tag_counts=counts,
            tag_labels=np.array([label for row in tag_labels for label in row], dtype=np.int64),
            tag_scores=np.array([s for row in table["tag_scores"].to_pylist() for s in row], dtype=np.float32),
            scores=scores,
            extra={name: [extra.get(name) for extra in extras] for name in names},
        )
        self.writer.write(batch, table["unit"].to_pylist())
        failures = 0
        for key, source, error in zip(keys, batch.sources, errors):
            if error is not None:
                failures += 1
                self.first_failure = self.first_failure or f"{source}: {error}"
                self.progress.log(error_row_line(key, source, error))
        if self.sidecars is not None:
            good = [row for row, error in enumerate(errors) if error is None]
            self.sidecars.write(
                [keys[row] for row in good],
                [batch.sources[row] for row in good],
                [[self.labels[index] for index in tag_labels[row]] for row in good],
            )
        self.failed += failures
        self.tagged += len(keys) - failures
        self.progress.advance(len(keys), failures)

    def tally(self) -> RunTally:
        sidecars = self.sidecars
        return RunTally(self.tagged, self.failed, self.first_failure, None if sidecars is None else sidecars.counts(),
                        None if sidecars is None else sidecars.first_failure)


def run_ray_tag(options: TagOptions, runtime: Runtime, ray_options: RayOptions, spec: RuntimeSpec,
                stdin=None) -> TagSummary:
    """Tag every input once on Ray; the driver's ``runtime`` encodes the vocabulary, the actors load ``spec``."""
    require_ray()
    import ray

    log = stderr_log(options.quiet)
    if options.save_maps:
        raise UsageError(SAVE_MAPS_ON_RAY)
    preflight_tag(options, is_main=True)
    vocabulary, thresholds = open_vocabulary(options, runtime, stdin, is_main=True)
    owned = connect(ray_options, options.quiet)
    try:
        resources = ray.cluster_resources()
        decoders = max(1, int(resources.get("CPU", 1) // ray_options.cpus_per_task))
        output = RunOutput.open(
            options.output,
            input_options(options),
            resume=options.resume,
            overwrite=options.overwrite,
            retry_errors=options.retry_errors,
            identity=_identity(vocabulary, runtime, options, thresholds),
            stdin=stdin,
            workers=decoders,
            log=log,
        )
        gpus_per_actor, actors = _pool(ray_options, resources)
        metadata = _metadata(runtime, vocabulary, options, thresholds)
        writer = output.writer(vocabulary.labels, metadata, all_scores=options.all_scores, rank=0,
                               part_rows=options.part_rows)
        progress = ImageProgress(output.pending_rows(), "tagging", quiet=options.quiet)
        sidecars = None
        if options.sidecars.enabled:
            sidecars = SidecarStage(options.sidecars, warn=progress.log, listing=output.listing)
        collector = _UnitCollector(writer, progress, options.all_scores, vocabulary.labels, sidecars)
        started = time.perf_counter()
        interrupted, failure = False, None
        stream = None
        try:
            if output.tasks:
                _quiet_ray_data(ray.data.DataContext.get_current())
                draft = runtime.config.preprocessing.image_size if options.fast_decode else None
                units = ray.data.from_items([describe_task(task) for task in output.tasks],
                                            override_num_blocks=len(output.tasks))
                decoded = units.map_batches(
                    decode_units,
                    batch_size=1,
                    batch_format="pyarrow",
                    num_cpus=ray_options.cpus_per_task,
                    # what a task holds: a table being filled and one waiting (Ray's backpressure bounds the
                    # rest); a stated memory also keeps Ray from fusing decoding into the actors, as it fuses
                    # stages of equal resources (CPU-only actors): decoding stays in CPU tasks of its own
                    memory=_decode_task_memory(runtime.config.preprocessing.image_size),
                    fn_kwargs={
                        "work_dir": str(output.work_dir),
                        "listing": str(output.listing),
                        "transform": runtime.transform(),
                        "max_pixels": options.max_pixels,
                        "draft_size": draft,
                        "block_rows": DECODE_BLOCK_ROWS,
                    },
                )
                scored = decoded.map_batches(
                    Scorer,
                    batch_size=options.batch_size or default_batch_size(runtime.device),
                    batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
                    num_gpus=gpus_per_actor,
                    fn_constructor_kwargs={
                        "spec": _actor_device(spec, gpus_per_actor),
                        "features": vocabulary.features.float().cpu().numpy(),
                        "fingerprint": runtime.fingerprint,
                        "top_k": options.top_k,
                        "threshold": options.threshold,
                        "thresholds": thresholds,
                        "all_scores": options.all_scores,
                        "precision": options.precision,
                    },
                )
                stream = iter(scored.iter_batches(batch_format="pyarrow", batch_size=None))
                for table in stream:
                    collector.take(table)
        except KeyboardInterrupt:
            interrupted = True
        except ray.exceptions.RayError as error:  # a stage failed past Ray's retries (e.g. no actor could start)
            failure = error
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()  # stops Ray Data's executor: no task keeps running for an abandoned run
            progress.close()
            try:
                writer.close()
            finally:
                if interrupted or failure is not None:
                    output.release()
        if interrupted:
            raise interrupted_run(output.kind != "stdout", output.done_rows + writer.rows_written)
        if failure is not None:
            kept = output.done_rows + writer.rows_written
            raise OutputError(
                f"the Ray run stopped: {_first_line(failure)}"
                + (f"; {kept} finished row(s) are kept, rerun with --resume" if kept and not output.is_stdout else "")
            ) from failure
    finally:
        if owned:
            ray.shutdown()
    final = output.finalize(metadata, all_scores=options.all_scores, failed_now=collector.failed)
    retried = f", {collector.duplicates} retried row(s) dropped" if collector.duplicates else ""
    return conclude(collector.tally(), final, time.perf_counter() - started, output.done_rows, quiet=options.quiet,
                    log=log, where_ran=" on Ray", notes=retried)
