"""Evaluate a RAM model on labelled images: one scoring pass per protocol, with baselines.

The protocols, settings and result types are :mod:`ramtag.engine.eval.types`; each protocol is a
separate pass: scores are softmaxes over the scored vocabulary and KCOT depends on it, so ZSL
scores are not GZSL scores restricted to the unseen columns. Evaluating a score table instead of
a model is :mod:`ramtag.engine.eval.table`; calibration is :mod:`ramtag.engine.eval.calibrate`.

Arms (``--baseline``): ``model`` is the loaded model's final score; ``training_free`` is RAM with
the same backbone and no adapter, tokens or prompts (``trained=False``, initial temperatures);
``clip_global`` is that training-free model's global score, softmax(cos / tau_g): CLIP's zero-shot
ranking. All arms score the same batches.

Distributed (torchrun): each rank scores a disjoint share; rank 0 gathers every rank's scores,
puts them back in data order and computes the metrics, so the result equals a single process's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ramtag.data.labelled import LabelledSource, LabelSpace, resolve_label_space
from ramtag.data.labelled_samples import LabelledShards, LabelTally, collate_labelled, labelled_dataset
from ramtag.engine import dist
from ramtag.engine.eval.calibrate import attach_calibration, calibration_protocol
from ramtag.engine.eval.protocol import arm_result, open_eval_source, plan_protocols, protocol_warnings
from ramtag.engine.eval.types import (
    CLIP_GLOBAL_ARM,
    MODEL_ARM,
    TRAINING_FREE_ARM,
    EvalResult,
    EvalSettings,
    Log,
    Protocol,
    ProtocolResult,
    ignore_log,
)
from ramtag.engine.signals import decode_worker_init
from ramtag.errors import DataError, RamtagError
from ramtag.fingerprint import fingerprint

Progress = Callable[[str, int, "int | None"], None]
"""Called as ``progress(protocol, images_done_on_this_rank, total_on_this_rank_or_None)``."""


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
    return Runtime(
        model=model,
        device=runtime.device,
        fingerprint=fingerprint(runtime.fingerprint, TRAINING_FREE_ARM),
        source={**runtime.source, "arm": TRAINING_FREE_ARM},
    )


def _scorers(runtime: Any, labels: Sequence[str], baseline: bool) -> list[_Scorer]:
    if not baseline:
        return [_Scorer(runtime, runtime.encode_labels(labels), {MODEL_ARM: "scores"})]
    if not runtime.config.trained:  # the loaded model is itself training-free: one forward feeds all
        arms = {MODEL_ARM: "scores", CLIP_GLOBAL_ARM: "global_scores"}
        return [_Scorer(runtime, runtime.encode_labels(labels), arms)]
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
        worker_init_fn=decode_worker_init,
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
        "scores": {
            arm: np.concatenate(parts) if parts else np.zeros((0, width), np.float32) for arm, parts in scores.items()
        },
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
            key, error = next(share["tally"].failed[0] for share in shares if share["tally"].failed)
            raise DataError(
                f"{protocol.title}: all {failed} image(s) failed to load; nothing to evaluate "
                f"(the first: {key}: {error})"
            )
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
    log: Log = ignore_log,
    progress: Progress | None = None,
) -> EvalResult | None:
    """Score DATA with ``runtime`` (and the baselines) under each protocol; rank 0 gets the result.

    Other ranks return None. ``log`` receives warnings as they arise (call it on rank 0 only).
    """
    info = dist.info()
    source = open_eval_source(data, settings)
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
            arm: arm_result(arm, protocol, scores, merged["targets"], space, settings.ks)
            for arm, scores in merged["scores"].items()
        }
        result = ProtocolResult(protocol, merged["keys"], merged["targets"], arms, merged["tally"])
        for message in protocol_warnings(result):
            warnings.append(message)
            log(message)
        results[protocol.name] = result
    if not info.is_main:
        return None
    notes = []
    if settings.baseline and not runtime.config.trained:
        notes.append(
            "the loaded model is training-free, so it is the training-free arm; "
            "CLIP global comes from the same forward pass"
        )
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
        protocol = calibration_protocol(results)
        attach_calibration(
            result,
            vocabulary_fingerprint=runtime.vocabulary_fingerprint(list(protocol.labels)),
            model_fingerprint=runtime.fingerprint,
            log=log,
        )
    return result


def _model_description(runtime: Any) -> dict[str, Any]:
    return {
        "fingerprint": runtime.fingerprint,
        "source": dict(runtime.source),
        "trained": bool(runtime.config.trained),
        "config": runtime.config.to_dict(),
        "device": str(runtime.device),
    }


__all__ = [
    "Progress",
    "evaluate_model",
    "training_free_runtime",
]
