"""The training recipe: setup -> train -> save (see ramtag.engine.train for what it computes and why).

One optimizer step (`_train_step`) is `grad_accum` calls of `_loss_step`, the global-batch MMC loss of one
micro-batch, then `_optimizer_step`: gradients summed over ranks, clipped, applied, and the EMA updated.

Why one module of about 480 lines: :class:`TrainRecipe`'s steps share one state (model, optimizer, scheduler,
EMA, stream position, log) that every step reads and writes; what could stand alone already does (data, model,
state files, log, schedule, batch norm, EMA, validation), and splitting the class further would pass that state
between modules instead of keeping it in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ramtag.atomic import write_json, write_text
from ramtag.data.augment import TrainAugment
from ramtag.data.labelled import open_labelled_source
from ramtag.data.labelled_samples import LabelledBatch
from ramtag.engine import dist
from ramtag.engine.runtime import autocast_dtype, resolve_device
from ramtag.engine.train import state as files
from ramtag.engine.train.batchnorm import synchronise_batchnorms
from ramtag.engine.train.config import TrainConfig, resolve_config
from ramtag.engine.train.data import StreamPosition, TrainBatches, nothing_to_learn, training_items, training_labels
from ramtag.engine.train.ema import TrainableEma
from ramtag.engine.train.log import METRICS_FILE, StepLog, TrainReporter, dropped_summary, step_record, truncate_metrics
from ramtag.engine.train.model import build_training_model, label_tokens, parameter_groups
from ramtag.engine.train.schedule import LearningRates, Schedule, default_warmup_epochs
from ramtag.engine.train.state import (
    previous_state,
    restore_rng_state,
    rng_state,
    save_model,
    save_training_state,
    seed_everything,
)
from ramtag.engine.train.validation import Validation
from ramtag.errors import DataError, UsageError
from ramtag.model.loss import mmc_loss


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


class TrainRecipe:
    """setup() -> train() -> save(); see the module docstring."""

    def __init__(self, config: TrainConfig):
        config.require_data()
        self.config = config
        self.output = Path(config.output)
        self.losses: list[float] = []

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
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)
        state = previous_state(cfg, self.output)
        if state is not None and self.info.is_main:
            truncate_metrics(self.output / METRICS_FILE, int(state["step"]))
        resume = state is not None
        self.reporter = TrainReporter(self.output, self.info.is_main, cfg.progress, cfg.tensorboard, resume=resume)
        self.log = self.reporter.info
        seed_everything(cfg.seed)

        self._setup_labels()
        self.model, self.include_backbone = build_training_model(cfg)
        self.model.config.train_vocabulary_size = len(self.seen)
        self.model.to(self.device).train()
        if self.info.distributed:
            replaced = synchronise_batchnorms(self.model.vision.adapters, self.device)
            dist.broadcast_tensors(self.model.trainable_state_dict().values())
            self.log(
                f"distributed: {self.info.world_size} processes; {replaced} adapter batch norm(s) synchronised "
                "across them"
            )
        teacher = cfg.teacher_weight > 0
        self.tokens, self.teacher_features = label_tokens(self.model, self.device, self.seen, self.unseen, teacher)
        self.use_teacher = self.teacher_features is not None
        self._setup_data()
        self._setup_optimisation()
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.validation = Validation(cfg, self.seen, self.unseen)
        if state is not None:
            self._restore(state)
        self._save_config()
        self._log_setup()

    def _setup_labels(self) -> None:
        from ramtag.data.vocab import read_labels

        cfg = self.config
        self.source = open_labelled_source(cfg.train, root=cfg.root, prefix_map=cfg.map_prefix)
        listed = read_labels(cfg.labels).labels if cfg.labels else None
        unseen = tuple(read_labels(cfg.unseen).labels) if cfg.unseen else ()
        self.labels = training_labels(self.source, listed, unseen, cfg.samples_per_epoch is None, self.log)
        self.seen, self.unseen = self.labels.seen, self.labels.unseen

    def _setup_data(self) -> None:
        cfg = self.config
        items, self.bad_images, self.dropped = training_items(self.source, self.labels, cfg.strict_labels)
        problem = nothing_to_learn(self.source, items, self.labels, self.dropped) if items else None
        if problem is not None:  # the whole list of drops goes beside train.log; the error line says the rest
            self.reporter.info(f"error: {problem}", echo=False)
            self._write_dropped()
            raise DataError(problem)
        self.data_fingerprint = None if self.source.is_shards else files.annotations_fingerprint(self.source.items)
        pre = self.model.config.preprocessing
        augment = TrainAugment(
            size=pre.image_size, mean=tuple(pre.mean), std=tuple(pre.std), padding=cfg.padding,
            flip=cfg.flip, erase=cfg.erase, photometric=cfg.photometric,
        )  # fmt: skip
        self.batches = TrainBatches(
            source=self.source, items=items, classes=self.seen, augment=augment, global_batch=cfg.batch_size,
            rank=self.info.rank, world_size=self.info.world_size, seed=cfg.seed, num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda", samples_per_epoch=cfg.samples_per_epoch,
            strict_labels=cfg.strict_labels, cls_classes=self.labels.space,
        )  # fmt: skip
        self.steps_per_epoch = self.batches.batches_per_epoch // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise DataError(
                f"{self.batches.size} images make {self.batches.batches_per_epoch} batch(es) of {cfg.batch_size}: "
                f"fewer than --grad-accum {cfg.grad_accum}"
            )
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.last_step = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        if cfg.val:  # read it now: a missing or malformed validation file must not wait for the first validation
            open_labelled_source(cfg.val, root=cfg.root, prefix_map=list(cfg.map_prefix))

    def _setup_optimisation(self) -> None:
        cfg = self.config
        adamw_groups, sgd_groups = parameter_groups(self.model, cfg)
        self.optimizers: list[torch.optim.Optimizer] = []
        if adamw_groups:
            self.optimizers.append(torch.optim.AdamW(adamw_groups, lr=cfg.lr))
        if sgd_groups:
            self.optimizers.append(torch.optim.SGD(sgd_groups, lr=cfg.token_lr, momentum=cfg.momentum))
        self.parameters = [p for group in adamw_groups + sgd_groups for p in group["params"]]
        warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else default_warmup_epochs(cfg.schedule, cfg.epochs)
        self.schedule = Schedule(cfg.schedule, self.steps_per_epoch, self.total_steps, warmup)
        self.rates = LearningRates(self.optimizers, self.schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.ema = TrainableEma(self.model.trainable_state_dict(), cfg.ema_decay) if cfg.ema_decay > 0 else None

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
        self.step, self.epoch, self.batch_in_epoch = (int(state[k]) for k in ("step", "epoch", "batch_in_epoch"))
        self.rates.go_to(self.step)
        streams = state.get("streams") or []
        if self.source.is_shards:
            if len(streams) != self.info.world_size:
                raise UsageError(
                    f"--resume: the run used {len(streams)} process(es); shard streams resume only with as many"
                )
            self.batches.stream = StreamPosition(*streams[self.info.rank])
        self.bad_images.update({k: v for k, v in state.get("bad_images", [])})
        self.validation.best = dict(state["best"])
        self.losses = []
        self.log(f"resumed at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})")

    def _save_config(self) -> None:
        if self.info.is_main:
            # Saved as a starting point: reused with --config it must start a run unless --resume is passed.
            write_json(self.output / files.CONFIG_FILE, {**self.config.to_dict(), "resume": False})

    def _log_setup(self) -> None:
        cfg, model = self.config, self.model
        trainable = sum(p.numel() for p in self.parameters)
        frozen = sum(p.numel() for p in model.clip.parameters())
        # The full dumps are for the record, not the terminal, where they ran to 30 lines on every start.
        self.reporter.info("settings: " + json.dumps(cfg.to_dict(), sort_keys=True), echo=False)
        self.reporter.info("model: " + json.dumps(model.config.to_dict(), sort_keys=True), echo=False)
        if cfg.init is not None:
            backbone = f"from {cfg.init}"
        else:
            backbone = cfg.model if cfg.model == "demo" or not cfg.pretrained else f"{cfg.model} / {cfg.pretrained}"
        self.log(f"model: {backbone}; settings in {self.output / files.CONFIG_FILE}, the full record in train.log")
        held_out = f", {len(self.unseen)} unseen held out" if self.unseen else ""
        self.log(f"labels: {len(self.seen)} seen ({self.labels.origin}){held_out}")
        self.log(
            f"data: {self.batches.size} training images, {self.steps_per_epoch} optimizer steps per epoch "
            f"(batch {cfg.batch_size} x {cfg.grad_accum} accumulated), {self.last_step} steps in all"
            + (f", {max(0, self.last_step - self.step)} left" if self.step else "")
        )
        if self.step >= self.last_step:
            self.log(
                f"the run is complete at step {self.step}; nothing to train (raise --max-steps or --epochs to go on)"
            )
        self.log(
            f"parameters: {trainable:,} trainable, {frozen:,} frozen in the backbone; device {self.device}, "
            f"precision {self.autocast_dtype or 'fp32'}"
        )
        if self.bad_images:
            self.log(
                f"{len(self.bad_images)} image(s) missing or unreadable so far, skipped; listed in "
                f"{self.output / files.BAD_IMAGES_FILE}"
            )
        if self.dropped:
            self.log(dropped_summary(self.dropped, self.unseen, self.output / files.DROPPED_LABELS_FILE))
            self._write_dropped()

    # -- train --------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Optimizer steps up to `last_step`, validating and saving on the way."""
        self.reporter.start(self.last_step, self.step)
        step_log = StepLog(self.reporter, self.config.log_every, self.last_step)
        try:
            while self.step < self.last_step:
                epoch, batches = self.epoch, iter(self.batches.epoch(self.epoch, self.batch_in_epoch))
                while self.epoch == epoch and self.step < self.last_step:
                    record = self._train_step(batches)
                    if record is not None:
                        if "loss" in record:
                            self.losses.append(record["loss"])
                        step_log.add(record)
                        self._maybe_validate_and_checkpoint()
        except KeyboardInterrupt:
            self._save_interrupted()
            raise
        finally:
            self.reporter.close()

    def _train_step(self, batches: Iterator[LabelledBatch]) -> dict[str, Any] | None:
        """One optimizer step over the next `grad_accum` micro-batches; None if the epoch's batches ran out."""
        cfg = self.config
        factor = self.schedule.factor(self.step)
        parts: list[dict[str, float]] = []
        skipped = 0
        for _ in range(cfg.grad_accum):
            batch = next(batches, None)
            if batch is None:  # the data ran out before the epoch's last step (cannot happen with whole batches)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                return None
            self._note_batch(batch)
            result = self._loss_step(batch)
            if result is None:
                skipped += 1
                continue
            loss, info = result
            self.scaler.scale(loss / cfg.grad_accum).backward()
            parts.append({"loss": float(loss.detach()), **info})
        grad_norm = self._optimizer_step() if parts else float("nan")
        # The data position moves with the step: an interrupted run resumes after its last whole step.
        self.step += 1
        self.batch_in_epoch += cfg.grad_accum
        if self.batch_in_epoch >= self.steps_per_epoch * cfg.grad_accum:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        record = step_record(self.step, self._epochs_done(), parts, factor, grad_norm, self.optimizers, self.model)
        if self.ema is not None:
            record["ema_decay"] = self.ema.current_decay()
        if skipped:
            record["skipped_micro_batches"] = skipped
        self.rates.advance()
        return record

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss_step(self, batch: LabelledBatch) -> tuple[torch.Tensor, dict[str, float]] | None:
        """Global-batch loss of one micro-batch; None (on every rank) when some rank has no usable image."""
        counts = dist.gather_counts(len(batch), self.device)
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
        all_targets = dist.gather_rows(targets, counts)
        loss_global = mmc_loss(dist.gather_rows(output.global_logits.float(), counts), all_targets)
        loss_local = mmc_loss(dist.gather_rows(output.local_logits.float(), counts), all_targets)
        parts = {"loss_global": float(loss_global.detach()), "loss_local": float(loss_local.detach())}
        return loss_global + loss_local, {**parts, "images": sum(counts)}

    def _optimizer_step(self) -> float:
        dist.all_reduce_gradients(self.parameters)
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

    def _note_batch(self, batch: LabelledBatch) -> None:
        for key, error in batch.failed:
            self.bad_images.setdefault(key, error)
        if self.source.is_shards and not self.labels.shard_items and self.batches.stream.pass_index == 0:
            self.dropped.update(batch.dropped)  # streamed shards: counted over the first pass

    def _epochs_done(self) -> float:
        return round(self.step / self.steps_per_epoch, 4)

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
        if final or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
            self._save_all(final=final)

    def _save_interrupted(self) -> None:
        if not self.info.distributed:
            # Resume from the last optimizer step: the micro-batches of an unfinished step are read again.
            self.log(f"interrupted at step {self.step}: saving the training state for --resume")
            self._save_all(final=False)
            return
        # Ranks stop at different points, some inside a collective: a save now could hang or mix steps.
        saved = self.output / files.STATE_FILE
        if saved.exists():
            then = f"--resume continues from {saved}"
        else:
            then = "none was saved yet, so --resume cannot continue this run"
        self.log(
            f"interrupted at step {self.step}; under torchrun the state is saved only every --checkpoint-every "
            f"{self.config.checkpoint_every} steps: {then}"
        )

    def _validate(self) -> None:
        exported, live = self.validation.metrics(self.model, self.ema, self.device, self.log)
        if not self.info.is_main:
            return
        record: dict[str, Any] = {"kind": "val", "step": self.step, "epoch": self._epochs_done(), **exported}
        if self.ema is not None and live is not None:
            record.update({f"live/{k}": v for k, v in live.items()})
        self.reporter.metrics(record)
        improved = self.validation.improved(exported, self.step)
        headline = ", ".join(f"{k} {v:.4f}" for k, v in exported.items() if k.endswith("/mAP") or k.endswith("F1@3"))
        self.log(f"validation at step {self.step} ({'EMA' if self.ema else 'live'} weights): {headline}")
        if improved:
            self._save_model(self.output / files.BEST_CHECKPOINT, use_ema=True)
            best = self.validation.best
            self.log(f"new best {best['metric']} {best['value']:.4f}: {self.output / files.BEST_CHECKPOINT}")

    # -- save ---------------------------------------------------------------------------------------------
    def _save_model(self, path: Path, use_ema: bool) -> None:
        ema = self.ema if use_ema else None
        extra = {"step": self.step, "seen_labels": list(self.seen), "unseen_labels": list(self.unseen)}
        save_model(path, self.model, ema, self.include_backbone, {**extra, "train_config": self.config.to_dict()})

    def _training_state(self) -> dict[str, Any]:
        streams = None
        if self.source.is_shards:
            position = self.batches.stream
            streams = [list(p) for p in dist.all_gather_objects([position.pass_index, position.consumed])]
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
            "best": self.validation.best,
            "config": self.config.to_dict(),
            "data_fingerprint": self.data_fingerprint,
        }

    def _save_all(self, final: bool) -> None:
        for share in dist.all_gather_objects(self.bad_images):  # every rank's skipped images, for the listing
            for key, error in share.items():
                self.bad_images.setdefault(key, error)
        state = self._training_state()
        if not self.info.is_main:
            return
        self._save_model(self.output / files.CHECKPOINT, use_ema=True)
        if self.ema is not None:
            self._save_model(self.output / files.LIVE_CHECKPOINT, use_ema=False)
        save_training_state(self.output / files.STATE_FILE, state)
        if self.bad_images:
            lines = "".join(f"{k}\t{v}\n" for k, v in sorted(self.bad_images.items()))
            write_text(self.output / files.BAD_IMAGES_FILE, lines)
        if self.source.is_shards and self.dropped:
            self._write_dropped()
        self.log(f"step {self.step}: saved {self.output / files.CHECKPOINT}" + (" (EMA weights)" if self.ema else ""))

    def _write_dropped(self) -> None:
        if self.info.is_main:
            lines = "".join(f"{label}\t{count}\n" for label, count in self.dropped.most_common())
            write_text(self.output / files.DROPPED_LABELS_FILE, lines)

    def save(self) -> TrainResult:
        summary = {
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "final_loss": self.losses[-1] if self.losses else None,
            "best": self.validation.best if self.validation.best.get("metric") else None,
            "validation": self.validation.last,
            "bad_images": len(self.bad_images),
            "dropped_label_occurrences": sum(self.dropped.values()),
            "checkpoint": str(self.output / files.CHECKPOINT),
        }
        if self.info.is_main:
            write_json(self.output / files.SUMMARY_FILE, summary)
        dist.barrier()
        return TrainResult(
            output=self.output, steps=self.step, checkpoint=self.output / files.CHECKPOINT, losses=list(self.losses),
            best=summary["best"], validation=self.validation.last, bad_images=len(self.bad_images),
        )  # fmt: skip


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
        saved = Path(options.get("output") or TrainConfig().output) / files.CONFIG_FILE
        if saved.exists():
            base = json.loads(saved.read_text(encoding="utf-8"))
    return train(resolve_config(config_file, options, base=base))
