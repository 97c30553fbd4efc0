"""Evaluate RAM (or a score table) on labelled images: the ZSL/GZSL protocol, baselines, calibration.

Protocols, as the reference defines them (its COCO ``test_17`` file is exactly the images of
``test_65`` that carry one of the 17 unseen labels, with only those labels kept):

* ``zsl``: the model scores the unseen labels only; images with at least one unseen label.
* ``gzsl``: the model scores seen plus unseen labels; every image.
* ``multilabel`` (no unseen list): the model scores the whole label space; every image.

Images without any label in a protocol's label set stay as negatives for every label, as the
reference's loader keeps them. Each protocol is a separate pass: scores are softmaxes over the
scored vocabulary and KCOT depends on it, so ZSL scores are not GZSL scores restricted to the
unseen columns.

Arms (``--baseline``): ``model`` is the loaded model's final score; ``training_free`` is RAM with
the same backbone and no adapter, tokens or prompts (``trained=False``, initial temperatures);
``clip_global`` is that training-free model's global score, softmax(cos / tau_g): CLIP's zero-shot
ranking. All arms score the same batches.

Distributed (torchrun): each rank scores a disjoint share; rank 0 gathers every rank's scores,
puts them back in data order and computes the metrics, so the result equals a single process's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ramtag.calibration import LabelThresholds, fit_thresholds
from ramtag.data.annotations import PrefixMapping
from ramtag.engine import dist
from ramtag.engine.labelled import (
    LabelledShards,
    LabelledSource,
    LabelSpace,
    LabelTally,
    collate_labelled,
    labelled_dataset,
    normalise_key,
    open_labelled_source,
    resolve_label_space,
    select_items,
)
from ramtag.errors import DataError, RamtagError, UsageError, VocabularyError
from ramtag.metrics import MetricsReport, evaluate_scores

Log = Callable[[str], None]
Progress = Callable[[str, int, "int | None"], None]
"""Called as ``progress(protocol, images_done_on_this_rank, total_on_this_rank_or_None)``."""

ZSL, GZSL, MULTILABEL = "zsl", "gzsl", "multilabel"
MODEL_ARM, TRAINING_FREE_ARM, CLIP_GLOBAL_ARM = "model", "training_free", "clip_global"
ARM_TITLES = {MODEL_ARM: "RAM", TRAINING_FREE_ARM: "training-free RAM", CLIP_GLOBAL_ARM: "CLIP global"}
PROTOCOL_TITLES = {ZSL: "ZSL", GZSL: "GZSL", MULTILABEL: "multi-label"}
VOCABULARY_METADATA_KEYS = ("vocabulary", "labels")
"""Where a score table's metadata may hold its vocabulary (a list of labels, or an object with ``labels``)."""
_MAX_EXAMPLES = 20


def _ignore(_: str) -> None:
    pass


@dataclass
class EvalSettings:
    """What to evaluate and how; the CLI fills it from its options."""

    root: str | None = None
    """Resolves relative image paths of the annotation file."""
    prefix_map: tuple[str, ...] = ()
    """``OLD=NEW`` rewrites applied to annotation paths before ``root``."""
    labels: tuple[str, ...] | None = None
    """The whole label space (seen plus unseen), in vocabulary order; default: from the data."""
    unseen: tuple[str, ...] | None = None
    """Held-out labels; when given, ZSL and GZSL are evaluated."""
    strict_labels: bool = False
    """Labels outside the label space are an error instead of being dropped."""
    ks: tuple[int, ...] = (3, 5)
    batch_size: int = 32
    workers: int | None = None
    """DataLoader decoding processes; None: cores - 1, at most 8 (as ``ramtag tag``)."""
    baseline: bool = False
    calibrate: bool = False
    target_precision: float | None = None
    """Calibrate to the lowest threshold reaching this precision; None: best F1 per label."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers cannot be negative, got {self.workers}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise UsageError(f"top-k values must be at least 1, got {list(self.ks)}")
        if self.target_precision is not None and not 0.0 < self.target_precision <= 1.0:
            raise UsageError(f"--target-precision must be in (0, 1], got {self.target_precision}")
        for mapping in self.prefix_map:
            if "=" not in mapping or mapping.startswith("="):
                raise UsageError(f"--map-prefix must look like OLD=NEW, got {mapping!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "prefix_map": list(self.prefix_map),
            "labels_given": self.labels is not None,
            "unseen_given": self.unseen is not None,
            "strict_labels": self.strict_labels,
            "ks": list(self.ks),
            "batch_size": self.batch_size,
            "workers": self.workers,
            "baseline": self.baseline,
            "calibrate": self.calibrate,
            "target_precision": self.target_precision,
        }


@dataclass(frozen=True)
class Protocol:
    name: str
    labels: tuple[str, ...]
    require_any: tuple[str, ...] | None = None
    """Only images with at least one of these labels (ZSL: the unseen labels)."""

    @property
    def title(self) -> str:
        return PROTOCOL_TITLES.get(self.name, self.name)


def plan_protocols(space: LabelSpace) -> list[Protocol]:
    """ZSL and GZSL when unseen labels are declared, else one multi-label evaluation."""
    if not space.unseen:
        return [Protocol(MULTILABEL, space.labels)]
    return [Protocol(ZSL, space.unseen, require_any=space.unseen), Protocol(GZSL, space.labels)]


@dataclass
class ArmResult:
    name: str
    metrics: MetricsReport
    scores: np.ndarray = field(repr=False)
    """``[images, labels]`` scores in data order."""
    extra: dict[str, float | None] = field(default_factory=dict)
    label: str | None = None
    """Display name; default from :data:`ARM_TITLES`."""

    @property
    def title(self) -> str:
        return self.label or ARM_TITLES.get(self.name, self.name)


@dataclass
class ProtocolResult:
    protocol: Protocol
    keys: list[str]
    targets: np.ndarray = field(repr=False)
    arms: dict[str, ArmResult]
    tally: LabelTally

    @property
    def name(self) -> str:
        return self.protocol.name

    @property
    def labels(self) -> tuple[str, ...]:
        return self.protocol.labels


@dataclass
class Calibration:
    """Per-label thresholds fitted on one protocol's scores of one arm, with their fingerprints."""

    protocol: str
    arm: str
    labels: tuple[str, ...]
    thresholds: LabelThresholds
    vocabulary_fingerprint: str | None
    model_fingerprint: str | None
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "arm": self.arm,
            "n_images": self.n_images,
            "vocabulary_fingerprint": self.vocabulary_fingerprint,
            "model_fingerprint": self.model_fingerprint,
            **self.thresholds.to_dict(self.labels),
        }


@dataclass
class EvalResult:
    """Everything rank 0 knows after an evaluation; :mod:`ramtag.engine.report` renders it."""

    protocols: dict[str, ProtocolResult]
    label_space: LabelSpace
    data: str
    model: dict[str, Any]
    settings: EvalSettings
    world_size: int = 1
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: Calibration | None = None
    score_table: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Shared steps


def _metrics(protocol: Protocol, scores: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> MetricsReport:
    if scores.shape[0] == 0:
        raise DataError(f"{protocol.title}: no image could be evaluated (every image failed or was skipped)")
    return evaluate_scores(scores, targets, ks=ks, label_names=protocol.labels)


def _group_map(metrics: MetricsReport, labels: Sequence[str], group: Sequence[str]) -> float | None:
    wanted = set(group)
    mask = np.array([label in wanted for label in labels]) & metrics.evaluated
    return float(metrics.ap[mask].mean()) if mask.any() else None


def _arm_result(name: str, protocol: Protocol, scores: np.ndarray, targets: np.ndarray, space: LabelSpace, ks: Sequence[int]) -> ArmResult:
    metrics = _metrics(protocol, scores, targets, ks)
    extra: dict[str, float | None] = {}
    if protocol.name == GZSL:  # how the all-label ranking serves each half
        extra["mAP_seen"] = _group_map(metrics, protocol.labels, space.seen)
        extra["mAP_unseen"] = _group_map(metrics, protocol.labels, space.unseen)
    return ArmResult(name, metrics, scores, extra)


def _protocol_warnings(result: ProtocolResult) -> list[str]:
    title = result.protocol.title
    out = [f"{title}: {message}" for message in result.tally.messages()]
    metrics = next(iter(result.arms.values())).metrics
    missing = metrics.labels_without_positives
    if missing:
        shown = ", ".join(map(repr, missing[:_MAX_EXAMPLES]))
        more = f" and {len(missing) - _MAX_EXAMPLES} more" if len(missing) > _MAX_EXAMPLES else ""
        out.append(
            f"{title}: {len(missing)} of {metrics.n_labels} label(s) have no positive image and are left out "
            f"of mAP (their AP is undefined): {shown}{more}"
        )
    return out


def _calibration_protocol(protocols: dict[str, ProtocolResult]) -> ProtocolResult:
    for name in (GZSL, MULTILABEL, ZSL):
        if name in protocols:
            return protocols[name]
    raise DataError("nothing to calibrate on")


def fit_calibration(
    result: EvalResult,
    *,
    vocabulary_fingerprint: str | None,
    model_fingerprint: str | None,
    arm: str = MODEL_ARM,
) -> Calibration:
    """Fit thresholds on the protocol that scores the whole vocabulary (GZSL, else the only one)."""
    protocol = _calibration_protocol(result.protocols)
    scores = protocol.arms[arm].scores
    thresholds = fit_thresholds(scores, protocol.targets, target_precision=result.settings.target_precision)
    return Calibration(
        protocol=protocol.name,
        arm=arm,
        labels=protocol.labels,
        thresholds=thresholds,
        vocabulary_fingerprint=vocabulary_fingerprint,
        model_fingerprint=model_fingerprint,
        n_images=int(scores.shape[0]),
    )


def calibration_warnings(calibration: Calibration) -> list[str]:
    from ramtag.calibration import STATUS_NO_POSITIVES, STATUS_PRECISION_UNREACHABLE

    out = []
    for status, why in (
        (STATUS_NO_POSITIVES, "have no positive image"),
        (STATUS_PRECISION_UNREACHABLE, f"never reach precision {calibration.thresholds.target_precision}"),
    ):
        indices = calibration.thresholds.labels_with_status(status)
        if indices:
            names = ", ".join(repr(calibration.labels[i]) for i in indices[:_MAX_EXAMPLES])
            more = f" and {len(indices) - _MAX_EXAMPLES} more" if len(indices) > _MAX_EXAMPLES else ""
            out.append(f"calibration: {len(indices)} label(s) {why}: threshold inf (never tagged): {names}{more}")
    return out


def write_calibration(path: str | os.PathLike, calibration: Calibration) -> Path:
    """Write the thresholds in the format ``ramtag tag --thresholds`` reads."""
    from ramtag.data.thresholds import write_thresholds

    if calibration.vocabulary_fingerprint is None or calibration.model_fingerprint is None:
        raise UsageError("cannot write thresholds without the vocabulary and model fingerprints")
    info: dict[str, object] = {
        "objective": calibration.thresholds.objective,
        "protocol": calibration.protocol,
        "calibration_images": calibration.n_images,
        "written_by": "ramtag eval --calibrate",
    }
    if calibration.thresholds.target_precision is not None:
        info["target_precision"] = calibration.thresholds.target_precision
    write_thresholds(
        path,
        calibration.labels,
        calibration.thresholds.thresholds,
        vocabulary_fingerprint=calibration.vocabulary_fingerprint,
        model_fingerprint=calibration.model_fingerprint,
        info=info,
    )
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Evaluating a model


@dataclass
class _Scorer:
    """One model, its label features over the whole label space, and the arms it feeds."""

    runtime: Any
    features: torch.Tensor
    arms: dict[str, str]
    """Arm name -> RamOutput field."""


def training_free_runtime(runtime: Any) -> Any:
    """Training-free RAM over the loaded model's own (shared) backbone: no adapter, tokens or prompts."""
    from ramtag.engine.runtime import Runtime
    from ramtag.model.ram import RamModel

    config = replace(runtime.config, trained=False, adapter_layers=(), prompt_layers=())
    model = RamModel(runtime.model.clip, config).to(runtime.device).eval()
    fingerprint = hashlib.sha256(f"{runtime.fingerprint}:training-free".encode()).hexdigest()[:16]
    return Runtime(model=model, device=runtime.device, fingerprint=fingerprint, source={**runtime.source, "arm": TRAINING_FREE_ARM})


def _scorers(runtime: Any, labels: Sequence[str], baseline: bool) -> list[_Scorer]:
    if not baseline:
        return [_Scorer(runtime, runtime.encode_labels(labels), {MODEL_ARM: "scores"})]
    if not runtime.config.trained:  # the loaded model is itself training-free: one forward feeds all
        return [_Scorer(runtime, runtime.encode_labels(labels), {MODEL_ARM: "scores", CLIP_GLOBAL_ARM: "global_scores"})]
    free = training_free_runtime(runtime)
    return [
        _Scorer(runtime, runtime.encode_labels(labels), {MODEL_ARM: "scores"}),
        _Scorer(free, free.encode_labels(labels), {TRAINING_FREE_ARM: "scores", CLIP_GLOBAL_ARM: "global_scores"}),
    ]


def _workers(settings: EvalSettings, dataset: Any) -> int:
    from ramtag.engine.tag import default_workers

    workers = default_workers() if settings.workers is None else settings.workers
    if isinstance(dataset, LabelledShards):  # a worker without a shard would idle
        workers = min(workers, len(dataset.shards[dataset.rank :: dataset.world_size]))
    return workers


def _unwrap_worker_error(exc: BaseException) -> BaseException:
    """DataLoader workers re-raise our errors with a traceback in the message: keep the last line."""
    if isinstance(exc, RamtagError) and "Traceback" in str(exc):
        last = str(exc).strip().splitlines()[-1]
        _, _, message = last.partition(": ")
        return type(exc)(message or last)
    return exc


def _score_pass(
    protocol: Protocol,
    source: LabelledSource,
    space: LabelSpace,
    scorers: list[_Scorer],
    settings: EvalSettings,
    info: dist.DistInfo,
    progress: Progress | None,
) -> dict[str, Any]:
    """This rank's share of one protocol: keys, orders, targets, scores per arm, tally."""
    columns = torch.tensor([space.labels.index(label) for label in protocol.labels])
    features = [scorer.features.index_select(0, columns).to(scorer.runtime.device) for scorer in scorers]
    dataset = labelled_dataset(
        source,
        protocol.labels,
        scorers[0].runtime.transform(),
        label_space=space.labels,
        require_any=protocol.require_any,
        strict=settings.strict_labels,
        rank=info.rank,
        world_size=info.world_size,
    )
    device = scorers[0].runtime.device
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=_workers(settings, dataset),
        collate_fn=collate_labelled,
        pin_memory=device.type == "cuda",
    )
    total = len(dataset) if hasattr(dataset, "__len__") else None
    tally = LabelTally()
    keys: list[str] = []
    orders: list[tuple[int, int]] = []
    targets: list[np.ndarray] = []
    scores: dict[str, list[np.ndarray]] = {arm: [] for scorer in scorers for arm in scorer.arms}
    done = 0
    for batch in loader:
        tally.update(batch)
        done += len(batch) + len(batch.failed)
        if batch.images is not None:
            for scorer, label_features in zip(scorers, features):
                output = scorer.runtime.score(batch.images, label_features)
                for arm, attribute in scorer.arms.items():
                    scores[arm].append(getattr(output, attribute).float().cpu().numpy())
            keys.extend(batch.keys)
            orders.extend(batch.orders)
            targets.append(batch.targets.numpy().astype(np.uint8))
        if progress is not None:
            progress(protocol.name, done, total)
    width = len(protocol.labels)
    return {
        "keys": keys,
        "orders": orders,
        "targets": np.concatenate(targets) if targets else np.zeros((0, width), np.uint8),
        "scores": {arm: np.concatenate(parts) if parts else np.zeros((0, width), np.float32) for arm, parts in scores.items()},
        "tally": tally,
    }


def _gather(local: dict[str, Any] | None, error: BaseException | None) -> list[dict[str, Any]]:
    """Every rank's share on every rank; a failure on any rank is raised on all of them."""
    payload = {"error": f"{type(error).__name__}: {error}"} if error is not None else local
    gathered = dist.all_gather_objects(payload)
    if error is not None:
        raise error
    failures = [(rank, share["error"]) for rank, share in enumerate(gathered) if "error" in share]
    if failures:
        rank, message = failures[0]
        raise DataError(f"rank {rank} failed: {message}")
    return gathered


def _check_not_empty(protocol: Protocol, shares: list[dict[str, Any]]) -> None:
    images = sum(len(share["keys"]) for share in shares)
    failed = sum(len(share["tally"].failed) for share in shares)
    if images == 0:
        if failed:
            raise DataError(f"{protocol.title}: all {failed} image(s) failed to load; nothing to evaluate")
        wanted = f" with any of the {len(protocol.require_any)} unseen labels" if protocol.require_any else ""
        raise DataError(f"{protocol.title}: no image{wanted}; nothing to evaluate")
    if not any(share["targets"].any() for share in shares):
        raise DataError(f"{protocol.title}: no image has any of the {len(protocol.labels)} labels: mAP is undefined")


def _merge(shares: list[dict[str, Any]]) -> dict[str, Any]:
    orders = [order for share in shares for order in share["orders"]]
    permutation = sorted(range(len(orders)), key=orders.__getitem__)
    keys = [key for share in shares for key in share["keys"]]
    targets = np.concatenate([share["targets"] for share in shares])[permutation]
    scores = {
        arm: np.concatenate([share["scores"][arm] for share in shares])[permutation] for arm in shares[0]["scores"]
    }
    return {
        "keys": [keys[i] for i in permutation],
        "targets": targets,
        "scores": scores,
        "tally": _sorted_failures(LabelTally.merged(share["tally"] for share in shares)),
    }


def _sorted_failures(tally: LabelTally) -> LabelTally:
    tally.failed.sort()  # the same listing whatever the number of ranks
    return tally


def evaluate_model(
    runtime: Any,
    data: Sequence[str] | str,
    settings: EvalSettings,
    *,
    log: Log = _ignore,
    progress: Progress | None = None,
) -> EvalResult | None:
    """Score DATA with ``runtime`` (and the baselines) under each protocol; rank 0 gets the result.

    Other ranks return None. ``log`` receives warnings as they arise (call it on rank 0 only).
    """
    info = dist.info()
    source = open_labelled_source(data, root=settings.root, prefix_map=_mappings(settings.prefix_map))
    space = resolve_label_space(source, settings.labels, settings.unseen)
    protocols = plan_protocols(space)
    scorers = _scorers(runtime, space.labels, settings.baseline)
    results: dict[str, ProtocolResult] = {}
    warnings: list[str] = [f"{source.description}: skipped {line}" for line in source.skipped_lines]
    for protocol in protocols:
        local, error = None, None
        try:
            local = _score_pass(protocol, source, space, scorers, settings, info, progress)
        except Exception as exc:  # reach the gather anyway, so no other rank waits forever
            error = _unwrap_worker_error(exc)
        shares = _gather(local, error)
        _check_not_empty(protocol, shares)  # on every rank, so that all stop together
        if not info.is_main:
            continue
        merged = _merge(shares)
        arms = {
            arm: _arm_result(arm, protocol, scores, merged["targets"], space, settings.ks)
            for arm, scores in merged["scores"].items()
        }
        result = ProtocolResult(protocol, merged["keys"], merged["targets"], arms, merged["tally"])
        for message in _protocol_warnings(result):
            warnings.append(message)
            log(message)
        results[protocol.name] = result
    if not info.is_main:
        return None
    notes = []
    if settings.baseline and not runtime.config.trained:
        notes.append("the loaded model is training-free, so it is the training-free arm; CLIP global comes from the same forward pass")
    result = EvalResult(
        protocols=results,
        label_space=space,
        data=source.description,
        model=_model_description(runtime),
        settings=settings,
        world_size=info.world_size,
        warnings=warnings,
        notes=notes,
    )
    if settings.calibrate:
        protocol = _calibration_protocol(results)
        result.calibration = fit_calibration(
            result,
            vocabulary_fingerprint=runtime.vocabulary_fingerprint(list(protocol.labels)),
            model_fingerprint=runtime.fingerprint,
        )
        for message in calibration_warnings(result.calibration):
            warnings.append(message)
            log(message)
    return result


def _mappings(prefix_map: Sequence[str]) -> list[PrefixMapping | str]:
    return list(prefix_map)


def _model_description(runtime: Any) -> dict[str, Any]:
    return {
        "fingerprint": runtime.fingerprint,
        "source": dict(runtime.source),
        "trained": bool(runtime.config.trained),
        "config": runtime.config.to_dict(),
        "device": str(runtime.device),
    }


# ---------------------------------------------------------------------------------------------
# Evaluating a score table


@dataclass
class ScoreTable:
    """Rows of a ``ramtag tag --all-scores`` table: scores of good rows, errors of failed ones."""

    path: str
    vocabulary: tuple[str, ...]
    keys: list[str]
    scores: np.ndarray = field(repr=False)
    """``[len(keys), C]`` float32 scores in vocabulary order."""
    errors: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_rows(self) -> int:
        return len(self.keys) + len(self.errors)

    def fingerprint(self, name: str) -> str | None:
        """A fingerprint recorded in the metadata, at top level or in the run's ``identity``."""
        for place in (self.metadata, self.metadata.get("identity") or {}):
            if isinstance(place, dict) and isinstance(place.get(name), str):
                return place[name]
        vocabulary = self.metadata.get("vocabulary")
        if isinstance(vocabulary, dict) and name == "vocabulary_fingerprint" and isinstance(vocabulary.get("fingerprint"), str):
            return vocabulary["fingerprint"]
        return None


def table_vocabulary(metadata: dict[str, Any], where: str) -> tuple[str, ...]:
    """The vocabulary a score table's metadata records (see :data:`VOCABULARY_METADATA_KEYS`)."""
    for name in VOCABULARY_METADATA_KEYS:
        value = metadata.get(name)
        if isinstance(value, dict):
            value = value.get("labels")
        if isinstance(value, list) and value and all(isinstance(label, str) for label in value):
            return tuple(value)
    raise DataError(
        f"{where}: the table's metadata records no vocabulary (expected a 'vocabulary' list); "
        "was it written by `ramtag tag --all-scores`?"
    )


def read_score_table(path: str | os.PathLike) -> ScoreTable:
    """Read a Parquet file, Parquet dataset directory or JSONL table with a ``scores`` column."""
    from ramtag.data.writers import read_table_metadata

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such score table")
    try:
        metadata = read_table_metadata(path)
    except RamtagError as exc:
        raise DataError(str(exc)) from exc
    if path.suffix.lower() in (".jsonl", ".ndjson") and not metadata:
        raise DataError(f"{path}: no metadata sidecar {path.name}.meta.json beside it, so its vocabulary is unknown")
    vocabulary = table_vocabulary(metadata, str(path))
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        keys, score_lists, errors = _read_jsonl_scores(path)
    else:
        keys, score_lists, errors = _read_parquet_scores(path)
    good_keys: list[str] = []
    good_rows: list[Any] = []
    error_rows: dict[str, str] = {}
    seen: set[str] = set()
    for key, scores, error in zip(keys, score_lists, errors):
        if key in seen:
            raise DataError(f"{path}: key {key!r} appears more than once")
        seen.add(key)
        if error is not None or scores is None:
            error_rows[key] = error or "no scores"
            continue
        good_keys.append(key)
        good_rows.append(scores)
    matrix = _score_matrix(good_rows, good_keys, len(vocabulary), str(path))
    return ScoreTable(str(path), vocabulary, good_keys, matrix, error_rows, metadata)


def _read_parquet_scores(path: Path) -> tuple[list[str], list[Any], list[str | None]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read as Parquet ({exc})") from exc
    if "scores" not in table.column_names:
        raise DataError(f"{path}: no 'scores' column; write the table with `ramtag tag --all-scores`")
    if "key" not in table.column_names:
        raise DataError(f"{path}: no 'key' column; not a ramtag tag table")
    errors = table["error"].to_pylist() if "error" in table.column_names else [None] * table.num_rows
    return table["key"].to_pylist(), table["scores"].to_pylist(), errors


def _read_jsonl_scores(path: Path) -> tuple[list[str], list[Any], list[str | None]]:
    keys, scores, errors = [], [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("key"), str):
                raise DataError(f"{path}:{number}: expected an object with a string 'key'")
            if "scores" not in row:
                raise DataError(f"{path}:{number}: no 'scores'; write the table with `ramtag tag --all-scores`")
            keys.append(row["key"])
            scores.append(row["scores"])
            errors.append(row.get("error"))
    return keys, scores, errors


def _score_matrix(rows: list[Any], keys: list[str], width: int, where: str) -> np.ndarray:
    matrix = np.zeros((len(rows), width), dtype=np.float32)
    for index, (key, row) in enumerate(zip(keys, rows)):
        if not isinstance(row, (list, tuple)) or len(row) != width:
            size = len(row) if isinstance(row, (list, tuple)) else type(row).__name__
            raise DataError(f"{where}: row {key!r} has {size} scores for a vocabulary of {width} labels")
        try:
            matrix[index] = row
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: row {key!r} holds a score that is not a number") from exc
    bad = np.isnan(matrix).any(axis=1)
    if bad.any():
        raise DataError(f"{where}: row {keys[int(np.argmax(bad))]!r} has NaN scores")
    return matrix


def _table_label_space(table: ScoreTable, source: LabelledSource, settings: EvalSettings) -> tuple[LabelSpace, Protocol]:
    vocabulary = table.vocabulary
    if settings.labels is None and source.classes is None:
        space = resolve_label_space(
            LabelledSource(description=source.description, classes=vocabulary), None, settings.unseen
        )
        space = replace(space, origin=f"vocabulary of {table.path}")
    else:
        space = resolve_label_space(source, settings.labels, settings.unseen)
    table_set = set(vocabulary)
    if not space.unseen:
        _require_same_labels(table_set, set(space.labels), table.path, space.origin)
        return space, Protocol(MULTILABEL, vocabulary)
    if table_set == set(space.unseen):
        return space, Protocol(ZSL, vocabulary, require_any=vocabulary)
    if table_set == set(space.labels):
        return space, Protocol(GZSL, vocabulary)
    raise VocabularyError(
        f"{table.path}: its vocabulary ({len(vocabulary)} labels) is neither the {len(space.unseen)} unseen labels "
        f"(ZSL) nor all {len(space.labels)} labels (GZSL); a score table holds one vocabulary's scores, "
        "so evaluate the ZSL and the GZSL tables in separate runs"
    )


def _require_same_labels(table_labels: set[str], truth: set[str], where: str, origin: str) -> None:
    if table_labels == truth:
        return
    missing = sorted(truth - table_labels)
    extra = sorted(table_labels - truth)
    parts = []
    if missing:
        parts.append(f"{len(missing)} label(s) of the {origin} are not scored ({', '.join(map(repr, missing[:5]))})")
    if extra:
        parts.append(f"{len(extra)} scored label(s) are not in the {origin} ({', '.join(map(repr, extra[:5]))})")
    raise VocabularyError(f"{where}: the score table's vocabulary does not match the ground truth: {'; '.join(parts)}")


def _examples(keys: Sequence[str]) -> list[str]:
    return list(keys[:_MAX_EXAMPLES])


def evaluate_score_table(
    table_path: str | os.PathLike,
    data: Sequence[str] | str,
    settings: EvalSettings,
    *,
    log: Log = _ignore,
) -> EvalResult:
    """Evaluate the scores of a ``ramtag tag --all-scores`` table against DATA, without a model.

    Rows join annotation images by key: the annotation path after ``--map-prefix``, relative to
    ``--root`` (or, failing that, the resolved path). Unmatched keys on either side are counted
    and reported; no match at all is an error.
    """
    if settings.baseline:
        raise UsageError("--baseline needs a model; a score table holds one scorer's scores")
    table = read_score_table(table_path)
    source = open_labelled_source(data, root=settings.root, prefix_map=_mappings(settings.prefix_map))
    space, protocol = _table_label_space(table, source, settings)
    if settings.strict_labels:
        known = set(space.labels)
        outside = Counter(
            label for item in source.labelled_items(space.labels) for label in item.labels if label not in known
        )
        if outside:
            listed = ", ".join(f"{label!r} ({count})" for label, count in outside.most_common(10))
            raise DataError(f"{source.description}: {len(outside)} label(s) outside the label space: {listed} (--strict-labels)")
    items = [item for _, item in select_items(source.labelled_items(space.labels), protocol.require_any)]
    if not items:
        raise DataError(f"{source.description}: no image has any of the {len(protocol.labels)} unseen labels")
    row_of = {normalise_key(key): row for row, key in enumerate(table.keys)}
    error_of = {normalise_key(key): error for key, error in table.errors.items()}
    column = {label: index for index, label in enumerate(protocol.labels)}
    known = set(space.labels)
    matched_rows: list[int] = []
    matched_keys: list[str] = []
    targets: list[np.ndarray] = []
    used: set[str] = set()
    tally = LabelTally()
    not_in_table: list[str] = []
    for item in items:
        candidates = [normalise_key(item.key)]
        if item.path is not None and item.path != item.key:
            candidates.append(normalise_key(item.path))
        hit = next((key for key in candidates if key in row_of or key in error_of), None)
        tally.dropped.update(label for label in item.labels if label not in known)
        if hit is None:
            not_in_table.append(item.key)
            continue
        used.add(hit)
        if hit in error_of:
            tally.failed.append((item.key, error_of[hit]))
            continue
        target = np.zeros(len(protocol.labels), dtype=np.uint8)
        for label in item.labels:
            if label in column:
                target[column[label]] = 1
        matched_rows.append(row_of[hit])
        matched_keys.append(item.key)
        targets.append(target)
    tally.images = len(matched_rows)
    unmatched = [key for key in table.keys + list(table.errors) if normalise_key(key) not in used]
    if protocol.name == ZSL:
        unmatched = []  # rows of images without unseen labels are expected to be left out
    coverage = {
        "table": table.path,
        "table_rows": table.n_rows,
        "table_error_rows": len(table.errors),
        "matched": len(matched_rows) + len(tally.failed),
        "table_keys_not_in_annotations": len(unmatched),
        "table_keys_not_in_annotations_examples": _examples(unmatched),
        "annotations_not_in_table": len(not_in_table),
        "annotations_not_in_table_examples": _examples(not_in_table),
        "metadata": {k: v for k, v in table.metadata.items() if k not in VOCABULARY_METADATA_KEYS},
    }
    if not matched_rows:
        raise DataError(
            f"no row of {table.path} matches an image of {source.description}: table keys look like "
            f"{_examples(table.keys)[:3]}, annotation keys like {[item.key for item in items[:3]]}; "
            "set --root to the folder the table's keys are relative to, and --map-prefix OLD=NEW for paths "
            "written on another machine"
        )
    target_matrix = np.stack(targets)
    tally.images_without_labels = int((target_matrix.sum(axis=1) == 0).sum())
    scores = table.scores[np.array(matched_rows)]
    arm = _arm_result(MODEL_ARM, protocol, scores, target_matrix, space, settings.ks)
    arm.label = "score table"
    result_protocol = ProtocolResult(protocol, matched_keys, target_matrix, {MODEL_ARM: arm}, tally)
    warnings: list[str] = []
    if not_in_table:
        warnings.append(
            f"{len(not_in_table)} of {len(items)} annotated image(s) have no row in the score table and are not "
            f"evaluated, e.g. {not_in_table[:3]}"
        )
    if unmatched:
        warnings.append(
            f"{len(unmatched)} row(s) of the score table match no annotated image, e.g. {unmatched[:3]}"
        )
    warnings.extend(_protocol_warnings(result_protocol))
    for message in warnings:
        log(message)
    result = EvalResult(
        protocols={protocol.name: result_protocol},
        label_space=space,
        data=source.description,
        model={
            "score_table": table.path,
            "fingerprint": table.fingerprint("model_fingerprint"),
            "vocabulary_fingerprint": table.fingerprint("vocabulary_fingerprint"),
        },
        settings=settings,
        warnings=warnings,
        score_table=coverage,
    )
    if settings.calibrate:
        vocabulary_fingerprint = table.fingerprint("vocabulary_fingerprint")
        model_fingerprint = table.fingerprint("model_fingerprint")
        if vocabulary_fingerprint is None or model_fingerprint is None:
            raise UsageError(
                f"{table.path} records no vocabulary and model fingerprints, so thresholds fitted on it could not be "
                "checked by `ramtag tag --thresholds`; calibrate with the model instead (--checkpoint ...)"
            )
        result.calibration = fit_calibration(
            result, vocabulary_fingerprint=vocabulary_fingerprint, model_fingerprint=model_fingerprint
        )
        for message in calibration_warnings(result.calibration):
            warnings.append(message)
            log(message)
    return result


__all__ = [
    "ARM_TITLES",
    "CLIP_GLOBAL_ARM",
    "GZSL",
    "MODEL_ARM",
    "MULTILABEL",
    "TRAINING_FREE_ARM",
    "ZSL",
    "ArmResult",
    "Calibration",
    "EvalResult",
    "EvalSettings",
    "Protocol",
    "ProtocolResult",
    "ScoreTable",
    "calibration_warnings",
    "evaluate_model",
    "evaluate_score_table",
    "fit_calibration",
    "plan_protocols",
    "read_score_table",
    "table_vocabulary",
    "training_free_runtime",
    "write_calibration",
]
