"""`ramtag train`: fit RAM's Ladder Local Adapters, adapter tokens, deep prompts and temperatures.

The recipe reads setup -> train -> save. One optimizer step is `grad_accum` calls of `_loss_step`: the MMC
loss on the global and local logits of the batch, with KCOT's teacher term in the transport cost.

Distributed runs (`torchrun --nproc-per-node N -m ramtag train ...`) see the global batch wherever the method
looks across it, so that one step of N processes with batch b equals one step of one process with batch N·b:

* the MMC softmax spans every image-label pair of the global batch: each rank gathers all ranks' logits and
  targets (its own slice keeps its gradient) and computes the same loss;
* the teacher's minimum, which fills the non-ground-truth entries, is the minimum over all ranks;
* the adapters' batch-norm statistics span all ranks (SyncBatchNorm on CUDA, `GlobalBatchNorm2d` elsewhere);
* there is no DDP wrapper: each rank's backward covers its own slice of the global loss, and the trainable
  gradients are all-reduced with SUM (not DDP's average), which gives exactly the gradient of the global loss.

Departures from the reference (github.com/EricTan7/RAM), all deliberate:

* its MMC loss and teacher minimum are per rank (per-GPU batch), so its multi-GPU runs optimise a different
  objective from its single-GPU runs; here both span the global batch. (The teacher minimum barely matters: it
  fills whole label columns of the cost with one constant, which a balanced transport plan ignores; only
  Sinkhorn's stopping point can see it.)
* its single-GPU loader does not shuffle; here every epoch is a seeded permutation, the same for any number of
  processes (see ramtag.engine.train_data);
* its EMA is re-created from the live weights at every epoch; here one EMA runs through the whole training,
  with the warm-up min(decay, (1 + t) / (10 + t));
* augmentation: same kinds and strengths, applied at the training size (see ramtag.engine.augment);
* `--grad-accum` has no reference counterpart: the MMC softmax spans one micro-batch (of every rank), so
  accumulating k batches of b is not the same objective as one batch of k·b.

Only rank 0 writes files. Outputs in `output`: `checkpoint.safetensors` (the EMA weights when EMA is on: what
to tag and evaluate with), `checkpoint-live.safetensors` (the live weights, with EMA on), `best.safetensors`
(best validation metric), `training-state.pt` (resume), `train-config.json`, `metrics.jsonl`, `train.log`,
`bad-images.txt`, `dropped-labels.txt`, `train-summary.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ramtag.atomic import atomic_path
from ramtag.engine import dist
from ramtag.engine.augment import TrainAugment
from ramtag.engine.batchnorm_sync import synchronise_batchnorms
from ramtag.engine.ema import TrainableEma
from ramtag.engine.labelled import LabelledBatch, LabelledItem, open_labelled_source, resolve_label_space
from ramtag.engine.runtime import Runtime, resolve_device
from ramtag.engine.schedule import Schedule, default_warmup_epochs
from ramtag.engine.train_config import BEST_METRIC_DEFAULT, TrainConfig, resolve_config
from ramtag.engine.train_data import StreamPosition, TrainBatches, find_missing_files
from ramtag.engine.train_log import TrainReporter
from ramtag.engine.train_model import build_training_model, parameter_groups, resolve_precision
from ramtag.engine.train_state import load_training_state, restore_rng_state, rng_state, save_training_state
from ramtag.errors import DataError, UsageError
from ramtag.model.checkpoint import save_checkpoint
from ramtag.model.loss import mmc_loss

CHECKPOINT = "checkpoint.safetensors"
LIVE_CHECKPOINT = "checkpoint-live.safetensors"
BEST_CHECKPOINT = "best.safetensors"
STATE_FILE = "training-state.pt"
CONFIG_FILE = "train-config.json"
SUMMARY_FILE = "train-summary.json"
BAD_IMAGES_FILE = "bad-images.txt"
DROPPED_LABELS_FILE = "dropped-labels.txt"


@dataclass
class TrainResult:
    output: Path
    steps: int
    checkpoint: Path
    losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step this process ran (the global-batch loss, the same on every rank)."""
    best: dict[str, Any] | None = None
    validation: dict[str, float] | None = None
    """The last validation's metrics, if any."""
    bad_images: int = 0
    """Training images that were missing or could not be decoded, skipped (listed in bad-images.txt)."""


# -- distribution ---------------------------------------------------------------------------------------


def gather_rows(tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows (counts may differ), keeping the gradient of this rank's rows."""
    if len(counts) == 1:
        return tensor
    longest = max(counts)
    padded = torch.cat([tensor, tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))]) if tensor.shape[0] < longest else tensor
    gathered = dist.gather_with_grad(padded)
    return torch.cat([gathered[r * longest: r * longest + n] for r, n in enumerate(counts)])


def _gather_counts(count: int, device: torch.device) -> list[int]:
    info = dist.info()
    if not info.distributed:
        return [count]
    import torch.distributed as torch_dist

    mine = torch.tensor([count], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(info.world_size)]
    torch_dist.all_gather(every, mine)
    return [int(c) for c in every]


def _all_reduce_gradients(parameters: list[nn.Parameter]) -> None:
    """Sum gradients over ranks: each rank's backward covered its own slice of the global loss."""
    if not dist.info().distributed:
        return
    import torch.distributed as torch_dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    offset = 0
    for parameter, grad in zip(parameters, grads):
        size = grad.numel()
        parameter.grad = flat[offset:offset + size].view_as(grad).clone()
        offset += size


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the recipe -------------------------------------------------------------------------------------------


class TrainRecipe:
    """setup() -> train() -> save(); see the module docstring."""

    def __init__(self, config: TrainConfig):
        config.require_data()
        self.config = config
        self.output = Path(config.output)
        self.losses: list[float] = []
        self.last_validation: dict[str, float] | None = None

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        try:
            self._setup()
        except BaseException:
            if getattr(self, "reporter", None) is not None:
                self.reporter.close()
            raise

    def _setup(self) -> None:
        cfg = self.config
        self.info = dist.setup(cfg.device)
        self.device = resolve_device(dist.device_for(self.info, cfg.device))
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        state = self._check_output()
        if state is not None and self.info.is_main:
            _truncate_metrics(self.output / "metrics.jsonl", int(state["step"]))
        self.reporter = TrainReporter(self.output, self.info.is_main, cfg.progress, cfg.tensorboard, resume=state is not None)
        self.log = self.reporter.info
        _seed_everything(cfg.seed)

        self._setup_labels()
        self.model, self.include_backbone = build_training_model(cfg)
        self.model.config.train_vocabulary_size = len(self.seen)
        self.model.to(self.device).train()
        if self.info.distributed:
            replaced = synchronise_batchnorms(self.model.vision.adapters, self.device)
            self._broadcast_trainable()
            self.log(f"distributed: {self.info.world_size} processes; {replaced} adapter batch norm(s) synchronised across them")
        self._setup_text()
        self._setup_data()
        self._setup_optimisation()
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best: dict[str, Any] = {"metric": self._best_metric_name(), "value": None, "step": None}
        if state is not None:
            self._restore(state)
        self._save_config()
        self._log_setup()

    def _check_output(self) -> dict | None:
        cfg = self.config
        state_path = self.output / STATE_FILE
        if cfg.resume:
            state = load_training_state(state_path)
            saved = TrainConfig.from_dict(state["config"])
            changed = cfg.changed_from(saved)
            if changed:
                raise UsageError(
                    f"--resume: these settings differ from the run in {self.output}: {', '.join(changed)} "
                    f"(resume with the original settings, e.g. --config {self.output / CONFIG_FILE})"
                )
            return state
        if state_path.exists():
            raise UsageError(f"{self.output} already holds a training run: pass --resume to continue it, or choose another --output")
        return None

    def _setup_labels(self) -> None:
        from ramtag.data.vocab import read_labels

        cfg = self.config
        self.source = open_labelled_source(cfg.train, root=cfg.root, prefix_map=cfg.map_prefix)
        listed = read_labels(cfg.labels).labels if cfg.labels else None
        self.unseen = tuple(read_labels(cfg.unseen).labels) if cfg.unseen else ()
        self.shard_items: list[LabelledItem] = []
        if self.source.is_shards and (listed is None or cfg.samples_per_epoch is None):
            # One pass over the shards' label members (images are not decoded): the label space and the epoch size.
            self.log("reading every shard's labels once (pass --labels and --samples-per-epoch to skip this)")
            self.shard_items = self.source.labelled_items(listed)
            if listed is None:
                listed = list(dict.fromkeys(label for item in self.shard_items for label in item.labels))
                if not listed:
                    raise DataError(f"{self.source.description}: no labelled sample in the shards")
        space = resolve_label_space(self.source, listed)
        if listed is not None and not cfg.labels:
            space = replace(space, origin=f"labels found in {self.source.description}")
        held_out = set(self.unseen)
        absent = [label for label in self.unseen if label not in space.labels]
        if absent:  # normal when the data carries seen labels only, but a typo would leave its label in training
            self.log(f"warning: {len(absent)} --unseen label(s) are not in the label space ({space.origin}), so "
                     f"nothing is held out for them: {', '.join(absent[:10])}{' …' if len(absent) > 10 else ''}")
        self.all_listed = space.labels
        self.seen = tuple(label for label in space.labels if label not in held_out)
        if not self.seen:
            raise DataError("no seen labels to train on: every label of the label space is in --unseen")
        self.label_origin = space.origin

    def _setup_text(self) -> None:
        import open_clip

        model = self.model
        runtime = Runtime(model=model, device=self.device, fingerprint="training")
        runtime.check_label_lengths(self.seen, [model.config.template])
        if self.unseen:
            runtime.check_label_lengths(self.unseen, [model.config.template])
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.text.context_length)
        self.tokens = tokenizer([model.config.template.format(label) for label in self.seen]).to(self.device)
        self.use_teacher = self.config.teacher_weight > 0
        self.teacher_features = None
        if self.use_teacher:
            with torch.no_grad():
                self.teacher_features = model.encode_labels(self.tokens, use_prompts=False).float()

    def _setup_data(self) -> None:
        cfg = self.config
        self.bad_images: dict[str, str] = {}
        self.dropped: Counter[str] = Counter()
        seen = set(self.seen)
        self.data_fingerprint = _annotations_fingerprint(self.source)
        if self.source.is_shards:
            items = self.shard_items
        else:
            items, missing = find_missing_files(self.source.items)
            self.bad_images.update(missing)
            for item in self.source.items:
                self.dropped.update(label for label in item.labels if label not in seen)
            if self.dropped and cfg.strict_labels:
                listed = ", ".join(f"{label!r} ({count})" for label, count in self.dropped.most_common(10))
                raise DataError(f"{self.source.description}: {len(self.dropped)} label(s) outside the label space: {listed} (--strict-labels)")
            items = [LabelledItem(i.key, i.path, tuple(l for l in i.labels if l in seen)) for i in items]
            if not items:
                raise DataError(f"{self.source.description}: none of the {len(self.source.items)} image files exist")
        pre = self.model.config.preprocessing
        augment = TrainAugment(
            size=pre.image_size, mean=tuple(pre.mean), std=tuple(pre.std), padding=cfg.padding,
            flip=cfg.flip, erase=cfg.erase, photometric=cfg.photometric,
        )
        self.batches = TrainBatches(
            source=self.source, items=items, classes=self.seen, augment=augment, global_batch=cfg.batch_size,
            rank=self.info.rank, world_size=self.info.world_size, seed=cfg.seed, num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda", samples_per_epoch=cfg.samples_per_epoch, strict_labels=cfg.strict_labels,
            cls_classes=self.all_listed,
        )
        self.steps_per_epoch = self.batches.batches_per_epoch // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise DataError(
                f"{self.batches.size} images make {self.batches.batches_per_epoch} batch(es) of {cfg.batch_size}: "
                f"fewer than --grad-accum {cfg.grad_accum}"
            )
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.last_step = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        if cfg.val:  # read it now: a missing or malformed validation file must not wait for the first validation
            from ramtag.engine.labelled import open_labelled_source

            open_labelled_source(cfg.val, root=cfg.root, prefix_map=list(cfg.map_prefix))

    def _setup_optimisation(self) -> None:
        cfg = self.config
        adamw_groups, sgd_groups = parameter_groups(self.model, cfg)
        self.optimizers = []
        if adamw_groups:
            self.optimizers.append(torch.optim.AdamW(adamw_groups, lr=cfg.lr))
        if sgd_groups:
            self.optimizers.append(torch.optim.SGD(sgd_groups, lr=cfg.token_lr, momentum=cfg.momentum))
        self.parameters = [p for group in adamw_groups + sgd_groups for p in group["params"]]
        warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else default_warmup_epochs(cfg.schedule, cfg.epochs)
        self.schedule = Schedule(cfg.schedule, self.steps_per_epoch, self.total_steps, warmup)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.ema = TrainableEma(self.model.trainable_state_dict(), cfg.ema_decay) if cfg.ema_decay > 0 else None

    def _broadcast_trainable(self) -> None:
        import torch.distributed as torch_dist

        for tensor in self.model.trainable_state_dict().values():
            torch_dist.broadcast(tensor.data if isinstance(tensor, nn.Parameter) else tensor, src=0)

    def _best_metric_name(self) -> str | None:
        if not self.config.val:
            return None
        metric = self.config.best_metric
        if metric == BEST_METRIC_DEFAULT:
            return "gzsl/mAP" if self.unseen else "multilabel/mAP"
        protocol = metric.split("/", 1)[0]
        wanted = ("zsl", "gzsl") if self.unseen else ("multilabel",)
        if protocol not in wanted:
            raise UsageError(f"--best-metric {metric}: validation reports {' and '.join(wanted)} {'with' if self.unseen else 'without'} --unseen")
        return metric

    def _restore(self, state: dict) -> None:
        saved_data = state.get("data_fingerprint")
        if saved_data is not None and saved_data != self.data_fingerprint:
            # The data position (epoch, batch) indexes this list: other images or labels cannot continue the run.
            raise UsageError(
                f"--resume: the training annotations ({self.source.description}) changed since the run in "
                f"{self.output} started; resume with the same data, or start a new run in another --output"
            )
        self.model.load_state_dict(state["model"], strict=False)
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        restore_rng_state(state["rng"])
        self.step, self.epoch, self.batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        streams = state.get("streams") or []
        if self.source.is_shards:
            if len(streams) != self.info.world_size:
                raise UsageError(f"--resume: the run used {len(streams)} process(es); shard streams resume only with as many")
            self.batches.stream = StreamPosition(*streams[self.info.rank])
        self.bad_images.update({k: v for k, v in state.get("bad_images", [])})
        self.best = dict(state["best"])
        self.losses = []
        self.log(f"resumed at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})")

    def _save_config(self) -> None:
        if self.info.is_main:
            # Saved as a starting point: reused with --config it must start a run unless --resume is passed.
            _write_json(self.output / CONFIG_FILE, {**self.config.to_dict(), "resume": False})

    def _log_setup(self) -> None:
        cfg, model = self.config, self.model
        trainable = sum(p.numel() for p in self.parameters)
        frozen = sum(p.numel() for p in model.clip.parameters())
        self.log("settings: " + json.dumps(self.config.to_dict(), sort_keys=True))
        self.log("model: " + json.dumps(model.config.to_dict(), sort_keys=True))
        self.log(
            f"labels: {len(self.seen)} seen ({self.label_origin})" + (f", {len(self.unseen)} unseen held out" if self.unseen else "")
        )
        self.log(
            f"data: {self.batches.size} training images, {self.steps_per_epoch} optimizer steps per epoch "
            f"(batch {cfg.batch_size} x {cfg.grad_accum} accumulated), {self.last_step} steps in all"
            + (f", {max(0, self.last_step - self.step)} left" if self.step else "")
        )
        if self.step >= self.last_step:
            self.log(f"the run is complete at step {self.step}; nothing to train (raise --max-steps or --epochs to go on)")
        self.log(f"parameters: {trainable:,} trainable, {frozen:,} frozen in the backbone; device {self.device}, "
                 f"precision {self.autocast_dtype or 'fp32'}")
        if self.bad_images:
            self.log(f"{len(self.bad_images)} image(s) missing or unreadable so far, skipped; listed in {self.output / BAD_IMAGES_FILE}")
        if self.dropped:
            common = ", ".join(f"{label!r} ({count})" for label, count in self.dropped.most_common(20))
            more = f" and {len(self.dropped) - 20} more" if len(self.dropped) > 20 else ""
            held_out = sum(count for label, count in self.dropped.items() if label in set(self.unseen))
            why = f", {held_out} of them --unseen labels" if held_out else ""
            self.log(f"{sum(self.dropped.values())} label occurrence(s) outside the seen label space dropped{why}; "
                     f"{len(self.dropped)} distinct: {common}{more} (all in {self.output / DROPPED_LABELS_FILE})")
            if self.info.is_main:
                lines = [f"{label}\t{count}" for label, count in self.dropped.most_common()]
                _write_text(self.output / DROPPED_LABELS_FILE, "\n".join(lines) + "\n")

    # -- train --------------------------------------------------------------------------------------------
    def _autocast(self):  # noqa: ANN202
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss_step(self, batch: LabelledBatch) -> tuple[torch.Tensor, dict[str, float]] | None:
        """Global-batch loss of one micro-batch; None (on every rank) when some rank has no usable image."""
        count = len(batch)
        counts = _gather_counts(count, self.device)
        if min(counts) == 0:
            return None
        images = batch.images.to(self.device, non_blocking=True)
        targets = batch.targets.to(self.device, non_blocking=True)
        with self._autocast():
            label_features = self.model.encode_labels(self.tokens)
            output = self.model(
                images,
                label_features,
                targets=targets if self.use_teacher else None,
                teacher_label_features=self.teacher_features,
                batch_minimum=dist.all_reduce_min,
            )
        all_targets = gather_rows(targets, counts)
        loss_global = mmc_loss(gather_rows(output.global_logits.float(), counts), all_targets)
        loss_local = mmc_loss(gather_rows(output.local_logits.float(), counts), all_targets)
        loss = loss_global + loss_local
        return loss, {"loss_global": float(loss_global.detach()), "loss_local": float(loss_local.detach()), "images": sum(counts)}

    def _set_learning_rates(self) -> float:
        factor = self.schedule.factor(self.step)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
        return factor

    def _optimizer_step(self) -> float:
        _all_reduce_gradients(self.parameters)
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        max_norm = self.config.clip_grad_norm if self.config.clip_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, max_norm))
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model.trainable_state_dict())
        return grad_norm

    def train(self) -> None:
        cfg = self.config
        self.reporter.start(self.last_step, self.step)
        window: list[dict[str, float]] = []
        started = time.perf_counter()
        boundary = (self.epoch, self.batch_in_epoch)
        try:
            while self.step < self.last_step:
                batches = self.batches.epoch(self.epoch, self.batch_in_epoch)
                end_of_epoch = self.steps_per_epoch * cfg.grad_accum
                micro, parts, skipped = 0, [], 0
                for batch in batches:
                    self._note_batch(batch)
                    if micro == 0:
                        factor = self._set_learning_rates()
                    result = self._loss_step(batch)
                    if result is None:
                        skipped += 1
                    else:
                        loss, info = result
                        self.scaler.scale(loss / cfg.grad_accum).backward()
                        parts.append({"loss": float(loss.detach()), **info})
                    micro += 1
                    self.batch_in_epoch += 1
                    if micro < cfg.grad_accum:
                        continue
                    grad_norm = self._optimizer_step() if parts else float("nan")
                    self.step += 1
                    record = self._step_record(parts, factor, grad_norm, skipped)
                    window.append(record)
                    if parts:
                        self.losses.append(record["loss"])
                    micro, parts, skipped = 0, [], 0
                    if self.step % cfg.log_every == 0 or self.step == self.last_step:
                        self._log_window(window, time.perf_counter() - started)
                        window, started = [], time.perf_counter()
                    self.reporter.advance(self.step, f"loss {record.get('loss', float('nan')):.4f}")
                    if self.batch_in_epoch >= end_of_epoch:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    boundary = (self.epoch, self.batch_in_epoch)
                    self._maybe_validate_and_checkpoint()
                    if self.step >= self.last_step or self.batch_in_epoch == 0:
                        break
                else:  # the data ran out before the epoch's last step (cannot happen with whole batches)
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        except KeyboardInterrupt:
            if not self.info.distributed:
                # Resume from the last optimizer step: the micro-batches of an unfinished step are read again.
                self.epoch, self.batch_in_epoch = boundary
                self.log(f"interrupted at step {self.step}: saving the training state for --resume")
                self._save_all(final=False)
            else:
                # Ranks stop at different points, some inside a collective: a save now could hang or mix steps.
                saved = self.output / STATE_FILE
                self.log(
                    f"interrupted at step {self.step}; under torchrun the state is saved only every "
                    f"--checkpoint-every {self.config.checkpoint_every} steps: "
                    + (f"--resume continues from {saved}" if saved.exists() else "none was saved yet, so --resume cannot continue this run")
                )
            raise
        finally:
            self.reporter.close()

    def _note_batch(self, batch: LabelledBatch) -> None:
        for key, error in batch.failed:
            self.bad_images.setdefault(key, error)
        if self.source.is_shards and self.batches.stream.pass_index == 0:
            self.dropped.update(batch.dropped)

    def _step_record(self, parts: list[dict[str, float]], factor: float, grad_norm: float, skipped: int) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": "train", "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4)}
        if parts:
            for key in ("loss", "loss_global", "loss_local"):
                record[key] = sum(p[key] for p in parts) / len(parts)
            record["images"] = sum(p["images"] for p in parts)
        record["lr_factor"] = factor
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                record[f"lr_{group['name']}"] = group["lr"]
        record["grad_norm"] = grad_norm
        record["temperature"] = float(self.model.temperature.detach())
        record["temperature_loc"] = float(self.model.temperature_loc.detach())
        if self.ema is not None:
            record["ema_decay"] = self.ema.current_decay()
        if skipped:
            record["skipped_micro_batches"] = skipped
        return record

    def _log_window(self, window: list[dict[str, Any]], seconds: float) -> None:
        last = dict(window[-1])
        losses = [r["loss"] for r in window if "loss" in r]
        if losses:
            last["loss_last"] = last.get("loss")
            last["loss"] = sum(losses) / len(losses)
        images = sum(r.get("images", 0) for r in window)
        last["images_per_s"] = images / seconds if seconds > 0 else None
        last.pop("images", None)
        self.reporter.metrics(last)
        if not self.reporter.has_progress:
            self.log(f"step {self.step}/{self.last_step} epoch {last['epoch']:.2f} loss {last.get('loss', float('nan')):.4f} "
                     f"lr x{last['lr_factor']:.3f} grad {last['grad_norm']:.3g}")

    def _maybe_validate_and_checkpoint(self) -> None:
        cfg = self.config
        final = self.step >= self.last_step
        epoch_done = self.batch_in_epoch == 0
        validate = bool(cfg.val) and (
            final
            or (cfg.val_every and self.step % cfg.val_every == 0)
            or (epoch_done and self.epoch % cfg.val_every_epochs == 0)
        )
        if validate:
            self._validate()
        checkpoint = final or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
        if checkpoint:
            self._save_all(final=final)

    # -- validation ---------------------------------------------------------------------------------------
    def _evaluate(self, report_warnings: bool) -> dict[str, float] | None:
        from ramtag.engine.eval_protocol import EvalSettings
        from ramtag.engine.evaluate import evaluate_model

        cfg = self.config
        labels = self.seen + self.unseen
        settings = EvalSettings(
            root=cfg.root, prefix_map=tuple(cfg.map_prefix), labels=labels, unseen=self.unseen or None, batch_size=cfg.val_batch_size,
            workers=cfg.num_workers, ks=(3, 5),
        )
        runtime = Runtime(model=self.model, device=self.device, fingerprint="training")
        result = evaluate_model(runtime, cfg.val, settings, log=self.log if report_warnings else (lambda _: None))
        if result is None:
            return None
        metrics: dict[str, float] = {}
        for name, protocol in result.protocols.items():
            arm = protocol.arms["model"]
            metrics.update({f"{name}/{key}": float(value) for key, value in arm.metrics.summary().items()})
            metrics.update({f"{name}/{key}": value for key, value in arm.extra.items() if value is not None})
        return metrics

    def _validate(self) -> None:
        self.model.eval()
        try:
            live = self._evaluate(report_warnings=True) if (self.ema is None or self.config.val_live) else None
            if self.ema is not None:
                with self.ema.applied_to(self.model):
                    exported = self._evaluate(report_warnings=live is None)
            else:
                exported = live
        finally:
            self.model.train()
        if not self.info.is_main:
            return
        record: dict[str, Any] = {"kind": "val", "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4)}
        record.update(exported)
        if self.ema is not None and live is not None:
            record.update({f"live/{k}": v for k, v in live.items()})
        self.reporter.metrics(record)
        self.last_validation = exported
        name = self.best["metric"]
        if name not in exported:
            raise UsageError(f"--best-metric {name}: validation reported {', '.join(sorted(exported))}")
        value = exported[name]
        headline = ", ".join(f"{k} {v:.4f}" for k, v in exported.items() if k.endswith("/mAP") or k.endswith("F1@3"))
        self.log(f"validation at step {self.step} ({'EMA' if self.ema else 'live'} weights): {headline}")
        if self.best["value"] is None or value > self.best["value"]:
            self.best = {"metric": name, "value": value, "step": self.step}
            self._save_model(self.output / BEST_CHECKPOINT, use_ema=True)
            self.log(f"new best {name} {value:.4f}: {self.output / BEST_CHECKPOINT}")

    # -- save ---------------------------------------------------------------------------------------------
    def _extra(self, weights: str) -> dict[str, Any]:
        return {
            "weights": weights,
            "step": self.step,
            "seen_labels": list(self.seen),
            "unseen_labels": list(self.unseen),
            "train_config": self.config.to_dict(),
        }

    def _save_model(self, path: Path, use_ema: bool) -> None:
        if use_ema and self.ema is not None:
            with self.ema.applied_to(self.model):
                save_checkpoint(path, self.model, include_backbone=self.include_backbone, extra=self._extra("ema"))
        else:
            save_checkpoint(path, self.model, include_backbone=self.include_backbone, extra=self._extra("live"))

    def _training_state(self) -> dict[str, Any]:
        streams = None
        if self.source.is_shards:
            position = self.batches.stream
            every = dist.all_gather_objects([position.pass_index, position.consumed])
            streams = [list(p) for p in every]
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.info.world_size,
            "model": self.model.trainable_state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "streams": streams,
            "bad_images": [[k, v] for k, v in self.bad_images.items()],
            "best": self.best,
            "config": self.config.to_dict(),
            "data_fingerprint": self.data_fingerprint,
        }

    def _save_all(self, final: bool) -> None:
        self._gather_bad_images()
        state = self._training_state()
        if not self.info.is_main:
            return
        self._save_model(self.output / CHECKPOINT, use_ema=True)
        if self.ema is not None:
            self._save_model(self.output / LIVE_CHECKPOINT, use_ema=False)
        save_training_state(self.output / STATE_FILE, state)
        if self.bad_images:
            _write_text(self.output / BAD_IMAGES_FILE, "".join(f"{k}\t{v}\n" for k, v in sorted(self.bad_images.items())))
        if self.source.is_shards and self.dropped:
            _write_text(self.output / DROPPED_LABELS_FILE, "".join(f"{l}\t{c}\n" for l, c in self.dropped.most_common()))
        self.log(f"step {self.step}: saved {self.output / CHECKPOINT}" + (" (EMA weights)" if self.ema else ""))

    def _gather_bad_images(self) -> None:
        if not self.info.distributed:
            return
        for share in dist.all_gather_objects(self.bad_images):
            for key, error in share.items():
                self.bad_images.setdefault(key, error)

    def save(self) -> TrainResult:
        summary = {
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "final_loss": self.losses[-1] if self.losses else None,
            "best": self.best if self.best.get("metric") else None,
            "validation": self.last_validation,
            "bad_images": len(self.bad_images),
            "dropped_label_occurrences": sum(self.dropped.values()),
            "checkpoint": str(self.output / CHECKPOINT),
        }
        if self.info.is_main:
            _write_json(self.output / SUMMARY_FILE, summary)
        dist.barrier()
        return TrainResult(
            output=self.output, steps=self.step, checkpoint=self.output / CHECKPOINT, losses=list(self.losses),
            best=summary["best"], validation=self.last_validation, bad_images=len(self.bad_images),
        )


# -- helpers ----------------------------------------------------------------------------------------------


def _annotations_fingerprint(source) -> str | None:
    """What the training images and their labels are, in order (shards: None; their list is in the settings)."""
    if source.is_shards:
        return None
    digest = hashlib.sha256()
    for item in source.items:
        digest.update(json.dumps([item.key, list(item.labels)], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step (written after the saved state, by the interrupted run)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    _write_text(path, "".join(f"{line}\n" for line in kept))


def train(config: TrainConfig) -> TrainResult:
    """Run a whole training (or its continuation with `config.resume`) and return what it did."""
    recipe = TrainRecipe(config)
    recipe.setup()
    recipe.train()
    return recipe.save()


def train_from_options(config_file: str | None, options: dict[str, Any]) -> TrainResult:
    """The CLI's entry: defaults < the saved run (with --resume) < the config file < explicit options."""
    base = None
    if options.get("resume"):
        output = Path(options.get("output") or TrainConfig().output)
        saved = output / CONFIG_FILE
        if saved.exists():
            base = json.loads(saved.read_text(encoding="utf-8"))
    config = resolve_config(config_file, options, base=base)
    return train(config)


__all__ = [
    "TrainRecipe", "TrainResult", "gather_rows",
    "train", "train_from_options",
]
